"""A faster way for TVMScript macros to find their parser (compile time only; the parsed kernels are the same).

Every `T.macro` call looks for the parser that is expanding it with `inspect.getouterframes`, which builds a
`FrameInfo` per frame of the stack: it resolves each frame's source file and module (a scan of `sys.modules`,
thousands of entries once torch is imported) and reads its source line.  Macros expand inside macros, so the
stacks are deep, and the AMX kernels expand hundreds of macros: on a 2-core Zen 3 the ViT fixture's AMX build
spent 45 of its 61 s there.  `install()` replaces the lookup by the same walk over the frames' globals,
without the `FrameInfo`s.
"""

from __future__ import annotations

import sys

from tvm.script.parser.core.parser import ScriptMacro


def _find_parser_def(self):
    frame = sys._getframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def install() -> None:
    """Use the frame walk above for every TVMScript macro (idempotent)."""
    ScriptMacro._find_parser_def = _find_parser_def


install()
