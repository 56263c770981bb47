"""runtime/op_schema.py is the schema the built library describes itself with (LrqOpSchema(), made
from the kernels' tables in lrq_ops.cc), so neither side can change alone."""
import ctypes

import pytest

from lrqgraph.runtime import available, library_path
from lrqgraph.runtime.op_schema import DOMAIN, OPS, OpInput, OpSchema

pytestmark = pytest.mark.skipif(not available(), reason="native ops not built (no C++ compiler or headers "
                                                        "at install time)")
FLAGS = {"required": True, "optional": False}


def library_schema() -> tuple[str, dict[str, OpSchema]]:
    """The domain and ops of LrqOpSchema()'s text: "domain D", then per op "op NAME",
    "input NAME TYPE[,TYPE...] required|optional" and "attribute NAME required|optional" lines."""
    fn = ctypes.CDLL(str(library_path())).LrqOpSchema
    fn.restype = ctypes.c_char_p
    domain, ops = None, {}
    for line in fn().decode().splitlines():
        kind, *rest = line.split()
        if kind == "domain":
            (domain,) = rest
        elif kind == "op":
            (name,) = rest
            assert name not in ops, f"{name} described twice"
            op = ops[name] = {"inputs": [], True: [], False: []}
        elif kind == "input":
            name, types, flag = rest
            op["inputs"].append(OpInput(name, tuple(types.split(",")), FLAGS[flag]))
        elif kind == "attribute":
            name, flag = rest
            op[FLAGS[flag]].append(name)
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return domain, {name: OpSchema(name, tuple(op["inputs"]), tuple(op[True]), tuple(op[False]))
                    for name, op in ops.items()}


def test_library_describes_the_python_schema():
    domain, ops = library_schema()
    assert domain == DOMAIN
    assert list(ops) == list(OPS)
    for name in OPS:
        assert ops[name] == OPS[name], name


def test_index_places_inputs_by_name():
    assert OPS["QMatMul"].index("bias") == 4
    assert OPS["QLowRankMatMul"].index("Q_codes") == 7
    assert OPS["KashinMatMul"].index("col_signs") == 5
    with pytest.raises(ValueError, match="has no input 'B_codes'"):
        OPS["KashinMatMul"].index("B_codes")
