"""Host project: the training program built with the host gcc and run natively, optionally with ASan/UBSan.

Options: sanitize (False), defines ({name: value} for -D). API: generate_project, build, run (../common/driver.py).
The host reports no instruction counts, stack or static RAM: those are board numbers.
"""

import importlib.util
import sys
from pathlib import Path

if "tinytrain_projects_driver" not in sys.modules:  # the shared driver, loaded by path: board folders are not packages
    _spec = importlib.util.spec_from_file_location("tinytrain_projects_driver", Path(__file__).resolve().parents[1] / "common" / "driver.py")
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
driver = sys.modules["tinytrain_projects_driver"]

SANITIZE_FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"


def _make_vars(options: dict) -> dict[str, str]:
    sanitize = SANITIZE_FLAGS if options["sanitize"] else ""
    return {"CC": "gcc", "TARGET": "tinytrain", "CFLAGS": f"{sanitize} {driver.define_flags(options['defines'])}".strip(), "LDFLAGS": sanitize}


BOARD = driver.Board(
    name="host",
    template_dirs=("common", "common/stdio", "host"),
    defaults={"sanitize": False, "defines": {}},
    make_vars=_make_vars,
    command=lambda program, options, args: [str(program), *args],
)


generate_project, build, run = driver.entry_points(BOARD)
