"""Regenerates the Python stubs of ``coserve.proto`` with grpc_tools.protoc.

Run from anywhere: ``python -m server.proto.generate`` (``make proto``). The stubs
(``coserve_pb2.py``, ``coserve_pb2.pyi``, ``coserve_pb2_grpc.py``) are checked in so
that installing the package needs no code generation; they are never edited by hand.
The proto is compiled with the repository root as include path, so the generated
modules import each other as ``server.proto.coserve_pb2``.
"""

from __future__ import annotations

import os
import sys

PROTO = "server/proto/coserve.proto"


def main() -> int:
    from grpc_tools import protoc  # only needed here, not at run time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
            f"--pyi_out={root}", f"--grpc_python_out={root}", os.path.join(root, PROTO)]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
