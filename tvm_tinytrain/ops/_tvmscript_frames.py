"""Cheaper caller-frame lookups for TVMScript's parser, with the same results.

TVMScript looks at its callers' frames twice per kernel we write in TIR: ``T.prim_func`` takes ``inspect.stack()``
(to see whether it decorates a class member and to resolve names used only in annotations), and each ``T.macro``
call scans the frames' globals for the parser it runs under (``ScriptMacro._find_parser_def``, through
``inspect.getouterframes``).  Both ask ``inspect`` for every frame's source file, module and source lines, which
under pytest's or a CLI's deep stacks cost more than the parsing itself: 8.5 of 9.2 s of TVMScript parsing in one
training-module build, and 6 of 45 s in one test of the fused block backward.  The parser reads only the frames,
their code objects and one frame's current line, so these walk ``f_back`` and take that line from ``linecache``
(where ``inspect`` takes it too).
"""

from __future__ import annotations

import inspect
import linecache
import sys

from tvm.script.parser.core.parser import ScriptMacro
from tvm.tirx.script.parser import entry as _tirx_entry


def _find_parser_def(self):
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


class _FrameInspect:
    """``inspect`` as ``T.prim_func`` sees it: ``stack()`` is the caller's frames, outermost last, each with its
    current source line (None where there is no source), as ``inspect.stack()`` gives them."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames = []
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals) if context else ""
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return frames


ScriptMacro._find_parser_def = _find_parser_def
_tirx_entry.inspect = _FrameInspect()
