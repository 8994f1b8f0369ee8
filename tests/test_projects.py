"""Board projects (microtvm_projects/) with the hand-written stand-in model: the host and QEMU Cortex-M4/M7 builds train
to the same weights bit for bit, QEMU measures instructions and stack, and images too large for the board, hangs and
faults come back as clear errors. The STM32F746 template is built, not run."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

PROJECTS = Path(__file__).resolve().parents[1] / "microtvm_projects"
STANDIN = PROJECTS / "common" / "testmodel"
STEPS = 40
RECORDS = 24
LR = 0.05

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed")
needs_qemu = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                                reason="arm-none-eabi-gcc or qemu-system-arm not installed")


def load_board(board: str):
    spec = importlib.util.spec_from_file_location(f"tinytrain_project_{board.replace('-', '_')}", PROJECTS / board / "project.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def symbol_address(executable: Path, name: str) -> int:
    symbols = subprocess.run(["arm-none-eabi-nm", str(executable)], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in symbols.splitlines() if line.endswith(f" {name}"))


host, qemu, stm32 = load_board("host"), load_board("qemu-cortex-m"), load_board("stm32f746")
driver = host.driver


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four classes a linear model over channel means can learn: class k > 0 brightens channel k - 1."""
    rng = np.random.default_rng(0)
    labels = np.arange(RECORDS) % 4
    images = rng.integers(-60, 60, (RECORDS, 3, 8, 8))
    for image, label in zip(images, labels):
        if label:
            image[label - 1] += 50
    return driver.write_dataset(tmp_path_factory.mktemp("data") / "data.bin", images.astype(np.int8), labels, num_classes=4)


@pytest.fixture(scope="module")
def host_project(tmp_path_factory) -> Path:
    return host.generate_project(STANDIN, tmp_path_factory.mktemp("host") / "project")


@pytest.fixture(scope="module")
def host_run(host_project, dataset, tmp_path_factory) -> dict:
    return host.run(host_project, dataset, STEPS, tmp_path_factory.mktemp("host_out"), lr=LR, eval_count=RECORDS)


def test_dataset_format(tmp_path):
    images = np.arange(2 * 3 * 8 * 8).astype(np.int8).reshape(2, 3, 8, 8)
    blob = driver.write_dataset(tmp_path / "d.bin", images, [3, 1], num_classes=4).read_bytes()
    assert blob[:4] == b"TTDS" and np.frombuffer(blob[4:20], "<u4").tolist() == [1, 2, 192, 4]
    assert np.frombuffer(blob[20:24], "<i4")[0] == 3 and blob[24:216] == images[0].tobytes()
    assert np.frombuffer(blob[216:220], "<i4")[0] == 1 and len(blob) == 20 + 2 * 196
    with pytest.raises(ValueError, match="int8"):
        driver.write_dataset(tmp_path / "bad.bin", images.astype(np.int16), [0, 1])


def test_host_trains_and_writes_outputs(host_run, host_project, dataset, tmp_path):
    assert len(host_run["losses"]) == STEPS and host_run["counter"] is None
    assert host_run["accuracy_after"] > host_run["accuracy_before"]
    meta = driver.read_meta(host_project / "model")
    trained = driver.read_weights(meta, host_run["weights"])
    assert trained["fc.weight"].shape == (4, 3) and trained["fc.bias"].shape == (4,)
    initial = driver.read_weights(meta, host.run(host_project, dataset, 0, tmp_path, eval_count=0)["weights"])
    assert not np.array_equal(initial["fc.weight"], trained["fc.weight"])


def test_host_sanitizers_agree(host_run, dataset, tmp_path):
    project = host.generate_project(STANDIN, tmp_path / "project", sanitize=True)
    result = host.run(project, dataset, STEPS, tmp_path / "out", lr=LR, eval_count=RECORDS)
    assert Path(result["weights"]).read_bytes() == Path(host_run["weights"]).read_bytes()


def _bad_datasets(folder: Path) -> dict[str, tuple[Path, str]]:
    """TTDS files the stand-in model (3x8x8 images, 4 classes) cannot train on, each with the error that names its fault."""
    images, labels = np.zeros((3, 3, 8, 8), np.int8), np.array([0, 1, 2])
    good = driver.write_dataset(folder / "good.bin", images, labels, num_classes=4).read_bytes()

    def raw(name, blob):
        (folder / name).write_bytes(blob)
        return folder / name

    return {
        "wide": (driver.write_dataset(folder / "wide.bin", np.zeros((2, 3, 8, 9), np.int8), [0, 1], num_classes=4),
                 "wide.bin: field image_bytes is 216; the model takes 192-byte images [(]3x8x8[)]"),
        "classes": (driver.write_dataset(folder / "classes.bin", images, labels, num_classes=5),
                    "classes.bin: field num_classes is 5; the model has 4 classes"),
        "label": (driver.write_dataset(folder / "label.bin", images, np.array([0, 9, -1]), num_classes=4),
                  "label.bin: record 1: label 9 is not in 0..3 [(]2 records in all[)]"),
        "short": (raw("short.bin", good[:-1]), "short.bin: 607 bytes, too short for the 3 records its header announces [(]608 bytes[)]"),
        "empty": (raw("empty.bin", good[:8] + b"\0\0\0\0" + good[12:20]), "empty.bin: field count is 0"),
        "magic": (raw("magic.bin", b"PK" + good[2:]), "magic.bin: not a TTDS dataset"),
        "version": (raw("version.bin", good[:4] + b"\2" + good[5:]), "version.bin: TTDS version 2; this driver reads version 1"),
        "missing": (folder / "missing.bin", "missing.bin: cannot read the dataset"),
    }


def test_dataset_that_does_not_fit_the_model(host_project, dataset, tmp_path):
    """Each fault is one error naming the file and the field or record, before the program runs; the previous
    run's outputs in the same folder stay as they were."""
    before = host.run(host_project, dataset, 2, tmp_path / "out", lr=LR)
    kept = {name: (tmp_path / "out" / name).read_bytes() for name in ("log.json", "weights.bin")}
    for data, message in _bad_datasets(tmp_path).values():
        with pytest.raises(driver.ProjectError, match=message) as error:
            host.run(host_project, data, 1, tmp_path / "out")
        assert not isinstance(error.value, driver.RunError), "checked before the program runs"
    assert {name: (tmp_path / "out" / name).read_bytes() for name in kept} == kept and len(before["losses"]) == 2
    assert not list(tmp_path.glob(".out*")), "no staging folder left"


@pytest.mark.parametrize("fault, message", [("wide", "216-byte images and 4 classes; the model takes 192-byte images"),
                                            ("label", "record 1: label 9 is not in 0..3"),
                                            ("short", "shorter than the 3 records its header announces"),
                                            ("magic", "is not a TTDS version 1 dataset")])
def test_program_refuses_the_dataset_itself(host_project, tmp_path, fault, message):
    """The training program checks the file too (a real board's compiled-in dataset has no driver beside it)."""
    data = _bad_datasets(tmp_path)[fault][0]
    proc = subprocess.run([str(host_project / "build" / "tinytrain"), str(data), "2", str(tmp_path), "-", "0"], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr


@needs_arm
def test_stm32_refuses_a_dataset_the_model_cannot_take(tmp_path):
    data, message = _bad_datasets(tmp_path)["label"]
    with pytest.raises(driver.ProjectError, match=message):
        stm32.generate_project(STANDIN, tmp_path / "project", dataset=data)
    assert not (tmp_path / "project").exists()


def test_unknown_option(tmp_path):
    with pytest.raises(driver.ProjectError, match="unknown option.*ram_size"):
        qemu.generate_project(STANDIN, tmp_path / "project", ram_size=1024)


@pytest.fixture(scope="module", params=["mps2-an386", "mps2-an500"])
def qemu_run(request, dataset, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    project = qemu.generate_project(STANDIN, root / "project", machine=request.param)
    return qemu.run(project, dataset, STEPS, root / "out", lr=LR, eval_count=RECORDS, timeout_s=60)


@needs_qemu
def test_qemu_matches_host_bit_for_bit(qemu_run, host_run):
    assert Path(qemu_run["weights"]).read_bytes() == Path(host_run["weights"]).read_bytes()
    assert qemu_run["losses"] == host_run["losses"]
    assert (qemu_run["accuracy_before"], qemu_run["accuracy_after"]) == (host_run["accuracy_before"], host_run["accuracy_after"])


@needs_qemu
def test_qemu_measures_instructions_stack_and_memory(qemu_run):
    assert qemu_run["counter"] == "instructions" and qemu_run["instructions_per_step"] > 0
    assert all(step["instructions"] > 0 for step in qemu_run["step_log"])
    sram = qemu_run["sram_bytes"]
    assert 0 < sram["stack_peak"] < 8 * 1024 and sram["bss"] >= sram["arena"] + sram["trainable"]
    assert sram["total"] == sram["data"] + sram["bss"] + sram["heap_peak"] + sram["stack_peak"] <= sram["reserved"] <= 320 * 1024
    assert qemu_run["flash_bytes"] > 0


@needs_arm
def test_image_too_large_names_region_and_overflow(tmp_path):
    fits = qemu.build(qemu.generate_project(STANDIN, tmp_path / "fits"))
    needed = symbol_address(fits.executable, "__stack_end") - qemu.RAM_ORIGIN  # RAM in use, alignment padding included
    project = qemu.generate_project(STANDIN, tmp_path / "project", ram_bytes=8 * 1024)
    with pytest.raises(driver.BuildError, match=r"region RAM overflowed by \d+ bytes \(RAM is 8192 bytes") as error:
        qemu.build(project)
    assert error.value.region == "RAM" and error.value.overflow_bytes == needed - 8 * 1024


@needs_qemu
def test_hang_is_reported_as_timeout(dataset, tmp_path):
    project = qemu.generate_project(STANDIN, tmp_path / "project", defines={"TINYTRAIN_TEST_HANG": 1})
    qemu.build(project)  # the timeout is for the run, not the compiler
    with pytest.raises(driver.RunTimeout, match="no result after 1 s, killed"):
        qemu.run(project, dataset, 1, tmp_path / "out", timeout_s=1)


@needs_qemu
def test_fault_is_reported(dataset, tmp_path):
    project = qemu.generate_project(STANDIN, tmp_path / "project", machine="mps2-an500", defines={"TINYTRAIN_TEST_FAULT": "0xF0000000"})
    with pytest.raises(driver.RunError, match=r"exited with code 3[\s\S]*fault: BusFault .*BFAR=0xf0000000") as error:
        qemu.run(project, dataset, 1, tmp_path / "out", timeout_s=30)
    assert error.value.returncode == 3


@needs_arm
def test_stm32f746_builds(dataset, tmp_path):
    project = stm32.generate_project(STANDIN, tmp_path / "project", dataset=dataset, steps=STEPS, lr=LR, eval_count=RECORDS)
    info = stm32.build(project)
    assert info.flash_bytes > dataset.stat().st_size and info.data_bytes + info.bss_bytes + info.heap_reserved_bytes + info.stack_reserved_bytes <= 320 * 1024
    assert symbol_address(info.executable, "vectors") == 0x08000000  # the vector table where the F746 boots from flash
    with pytest.raises(driver.ProjectError, match="openocd"):
        stm32.run(project, dataset, STEPS, tmp_path / "out")


def test_stm32f746_serial_capture(tmp_path):
    capture = "tinytrain starting\r\n#file weights.bin\r\n00ff10\r\n#end weights.bin\r\n#file log.json\r\n7b7d\r\n#end log.json\r\n\r\n#exit 0\r\n"
    assert stm32.read_serial_capture(capture, tmp_path) == 0
    assert (tmp_path / "weights.bin").read_bytes() == b"\x00\xff\x10" and (tmp_path / "log.json").read_text() == "{}"
    with pytest.raises(driver.RunError, match="no #exit"):
        stm32.read_serial_capture("#file log.json\r\n7b\r\n", tmp_path)
