"""STM32F746 project (Cortex-M7, 320 KB SRAM at 0x20000000, 1 MB flash at 0x08000000): the training program for the
real board. A board has no files, so the dataset and the arguments are compiled in; outputs go out on USART1.

Options: dataset (a TTDS file, required), steps (100), lr (None: the model's), eval_count (0), ram_bytes / flash_bytes
(the board's regions), stack_bytes / heap_bytes (reserves inside RAM), defines ({name: value} for -D).
API: generate_project, build (../common/driver.py); run is not done by this driver (the board must be flashed and its
serial line captured), read_serial_capture turns a capture into weights.bin and log.json.
"""

import importlib.util
import re
import sys
from pathlib import Path

if "tinytrain_projects_driver" not in sys.modules:  # the shared driver, loaded by path: board folders are not packages
    _spec = importlib.util.spec_from_file_location("tinytrain_projects_driver", Path(__file__).resolve().parents[1] / "common" / "driver.py")
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
driver = sys.modules["tinytrain_projects_driver"]

FLASH_ORIGIN, RAM_ORIGIN = 0x08000000, 0x20000000  # DTCM 64 KB + SRAM1 240 KB + SRAM2 16 KB are contiguous: one RAM region


def _dataset_source(options: dict) -> dict[str, str]:
    if not options["dataset"]:
        raise driver.ProjectError("stm32f746: option dataset (a TTDS file) is required: the board has no files, the data is compiled in")
    path = Path(options["dataset"])
    blob = path.read_bytes()
    name = re.sub(r"[^\w.-]", "_", path.name)
    lr = "-" if options["lr"] is None else repr(float(options["lr"]))
    args = ["tinytrain", name, str(int(options["steps"])), "serial", lr, str(int(options["eval_count"]))]
    rows = (",".join(str(b) for b in blob[i:i + 32]) for i in range(0, len(blob), 32))
    return {"dataset.c": (
        f"/* Written by generate_project: {name} ({len(blob)} bytes) and the program's arguments, in flash. */\n"
        "#include <stdint.h>\n\n"
        f"const uint32_t tinytrain_dataset_bytes = {len(blob)};\n"
        "const uint8_t tinytrain_dataset[] = {\n" + ",\n".join(rows) + "\n};\n"
        "const char *const tinytrain_argv[] = {" + ", ".join(f'"{a}"' for a in args) + "};\n"
        f"const int tinytrain_argc = {len(args)};\n")}


BOARD = driver.Board(
    name="stm32f746",
    template_dirs=("common", "common/cortex_m", "stm32f746"),
    defaults={"dataset": None, "steps": 100, "lr": None, "eval_count": 0, "ram_bytes": 320 * 1024, "flash_bytes": 1024 * 1024,
              "stack_bytes": 8 * 1024, "heap_bytes": 4 * 1024, "defines": {}},
    # The F746's FPU is single precision (FPv5-SP).
    make_vars=lambda options: driver.cortex_m_make_vars("cortex-m7-sp", options, "nosys.specs", FLASH_ORIGIN, RAM_ORIGIN),
    size_tool="arm-none-eabi-size",
    generated_sources=_dataset_source,
    not_run="flash build/tinytrain.elf (openocd -f board/stm32f7discovery.cfg -c 'program build/tinytrain.elf verify reset exit'), "
            "capture USART1 at 115200 baud and decode the capture with read_serial_capture(text, out_dir)",
)

generate_project, build, run = driver.entry_points(BOARD)


def read_serial_capture(text: str, out_dir) -> int:
    """Writes the files of a serial capture (#file NAME / hex lines / #end NAME) to out_dir; returns the #exit code."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, hex_lines, code = None, [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#file "):
            name, hex_lines = line[len("#file "):], []
        elif line.startswith("#end ") and name == line[len("#end "):]:
            (out_dir / name).write_bytes(bytes.fromhex("".join(hex_lines)))
            name = None
        elif line.startswith("#exit "):
            code = int(line[len("#exit "):])
        elif name is not None and re.fullmatch(r"(?:[0-9a-f]{2})+", line):
            hex_lines.append(line)
    if code is None:
        raise driver.RunError("stm32f746: the capture has no #exit line: the program did not finish (or the capture stopped early)")
    return code
