"""QEMU Cortex-M project: the training program on an emulated mps2 board, data and outputs through semihosting.

Options: machine ("mps2-an386": Cortex-M4F, "mps2-an500": Cortex-M7), ram_bytes / flash_bytes (the real board's
regions, 320 KB SRAM and 1 MB flash by default, so an image too large for it fails to link), stack_bytes / heap_bytes
(reserves inside RAM), defines ({name: value} for -D). API: generate_project, build, run (../common/driver.py).
run counts instructions per training step (SysTick under -icount shift=0) and measures the stack's high-water mark.
"""

import importlib.util
import sys
from pathlib import Path

if "tinytrain_projects_driver" not in sys.modules:  # the shared driver, loaded by path: board folders are not packages
    _spec = importlib.util.spec_from_file_location("tinytrain_projects_driver", Path(__file__).resolve().parents[1] / "common" / "driver.py")
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
driver = sys.modules["tinytrain_projects_driver"]

MACHINES = {"mps2-an386": "cortex-m4", "mps2-an500": "cortex-m7"}
FLASH_ORIGIN, RAM_ORIGIN = 0x00000000, 0x20000000  # the mps2 code and data memories


def _make_vars(options: dict) -> dict[str, str]:
    if options["machine"] not in MACHINES:
        raise driver.ProjectError(f"qemu-cortex-m: machine {options['machine']!r} is not one of {', '.join(MACHINES)}")
    return driver.cortex_m_make_vars(MACHINES[options["machine"]], options, "rdimon.specs", FLASH_ORIGIN, RAM_ORIGIN)


def _command(program: Path, options: dict, args: list[str]) -> list[str]:
    # Semihosting hands the program its arguments as one space-separated line; in QEMU's option syntax "," is doubled.
    spaced = [arg for arg in args if " " in arg]
    if spaced:
        raise driver.ProjectError(f"qemu-cortex-m: semihosting cannot pass arguments with spaces: {spaced}")
    config = ",".join(["enable=on", "target=native", *(f"arg={arg.replace(',', ',,')}" for arg in ["tinytrain", *args])])
    return ["qemu-system-arm", "-machine", options["machine"], "-nodefaults", "-display", "none", "-icount", "shift=0",
            "-semihosting-config", config, "-kernel", str(program)]


BOARD = driver.Board(
    name="qemu-cortex-m",
    template_dirs=("common", "common/stdio", "common/cortex_m", "qemu-cortex-m"),
    defaults={"machine": "mps2-an386", "ram_bytes": 320 * 1024, "flash_bytes": 1024 * 1024, "stack_bytes": 8 * 1024, "heap_bytes": 4 * 1024,
              "defines": {}},
    make_vars=_make_vars,
    size_tool="arm-none-eabi-size",
    command=_command,
)

generate_project, build, run = driver.entry_points(BOARD)
