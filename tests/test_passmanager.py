"""The pass manager: pipeline strings, registry, analysis caching and invalidation, error messages."""
import time

import pytest

import lrqgraph
from lrqgraph import Context, InternalError, LrqError, OptimizeConfig, Pass, PassManager, PassResult, register_analysis, register_pass
from lrqgraph.model import ModelState
from lrqgraph.passmanager import PASSES, parse_pipeline

from builders import matmul_model
from conftest import restored_registries

CALLS = {"count": 0}
SEEN = []


def _counter(ctx):
    CALLS["count"] += 1
    return CALLS["count"]


class ReadCounter(Pass):
    name = "test_read"

    def run(self, ctx):
        SEEN.append(ctx.analysis("test_counter"))
        return PassResult(False)


class Wait(Pass):
    name = "test_wait"

    def run(self, ctx):
        time.sleep(0.02)
        return PassResult(False)


class Touch(Pass):
    name = "test_touch"
    positional = ("keep",)

    def run(self, ctx):
        keep = self.params.get("keep")
        return PassResult(True, frozenset({"test_counter"}) if keep else frozenset())


class Boom(Pass):
    name = "test_boom"

    def run(self, ctx):
        raise ValueError("kaput")


@pytest.fixture(autouse=True, scope="module")
def toy_passes():
    """The toy analyses and passes below, registered for this module's tests only."""
    with restored_registries():
        register_analysis("test_counter")(_counter)
        register_analysis("test_base")(_base)
        register_analysis("test_derived", requires=("test_base",), config=("select",))(_derived)
        for cls in (ReadCounter, Wait, Touch, Boom, KeepDerivedOnly, BreakGraph):
            register_pass(cls)
        yield


def _ctx():
    return Context(ModelState(matmul_model()), OptimizeConfig())


def test_pipeline_string_parses_names_positional_and_keyword_arguments():
    passes = parse_pipeline("discover, factorize(method=lplr,rank_ratio=0.25,symmetric=false), lower(std),cleanup")
    assert [p.name for p in passes] == ["discover", "factorize", "lower", "cleanup"]
    assert passes[1].params == {"method": "lplr", "rank_ratio": 0.25, "symmetric": False}
    assert passes[2].params == {"target": "std"}


def test_unknown_pass_and_bad_syntax_are_clear_errors():
    with pytest.raises(LrqError, match="unknown pass 'nope'.*registered passes"):
        parse_pipeline("discover,nope")
    with pytest.raises(LrqError, match="cannot parse pipeline"):
        parse_pipeline("discover,(x)")


def test_builtin_passes_are_registered():
    parse_pipeline("discover")
    assert {"discover", "factorize", "lower", "cleanup", "verify"} <= set(PASSES)


def test_analyses_are_cached_until_a_pass_invalidates_them():
    CALLS["count"] = 0
    SEEN.clear()
    ctx = _ctx()
    PassManager("test_read,test_read,test_touch(true),test_read,test_touch,test_read").run(ctx)
    # computed once, preserved by test_touch(true), recomputed after the plain test_touch
    assert SEEN == [1, 1, 1, 2]


def test_managers_nest_and_time_every_pass():
    ctx = _ctx()
    inner = PassManager("test_wait,test_touch")
    result = PassManager([inner, parse_pipeline("test_read")[0]]).run(ctx)
    assert result.modified
    # the inner manager's passes, then the inner manager itself as one pass of the outer one
    assert [t.name for t in ctx.timings] == ["test_wait", "test_touch", "test_wait,test_touch", "test_read"]
    wait, touch, nested, _ = (t.seconds for t in ctx.timings)
    # each pass's time covers its work (test_wait sleeps 20 ms), and the inner manager's entry spans
    # its passes (timings are rounded to 0.1 ms: three roundings)
    assert wait >= 0.02 and nested >= wait + touch - 1.5e-4


def test_a_bug_in_a_pass_is_an_internal_error_naming_the_pass_and_those_before_it():
    with pytest.raises(InternalError, match=r"pass 'test_boom' failed after test_read, test_touch: ValueError: kaput") \
            as caught:
        PassManager("test_read,test_touch,test_boom").run(_ctx())
    assert not isinstance(caught.value, LrqError)  # a bug is not bad input (exit 3, not 2)
    assert isinstance(caught.value.__cause__, ValueError)  # --debug prints this traceback


def test_unknown_pass_option_is_a_clear_error():
    with pytest.raises(LrqError, match="unknown option.*bitz"):
        lrqgraph.run(matmul_model(), passes="discover,factorize(bitz=3)")


class BreakGraph(Pass):
    """Drops the node that makes the graph's output: the model no longer passes onnx's checker."""
    name = "test_break"
    positional = ("report",)

    def run(self, ctx):
        produced = ctx.model.graph.outputs[0]
        ctx.model.graph.nodes = [n for n in ctx.model.graph.nodes if produced not in n.outputs]
        return PassResult(bool(self.params.get("report", True)), frozenset())


def test_check_each_pass_runs_the_checker_after_modifying_passes():
    checked = OptimizeConfig(check_each_pass=True, select=lrqgraph.SelectConfig(min_params=1))
    result = lrqgraph.run(matmul_model(), checked, passes="discover,factorize,lower,cleanup")
    assert any(n.op_type == "MatMulNBits" for n in result.model.graph.node)  # a sound pipeline passes
    with pytest.raises(LrqError, match=r"graph check failed: .* \[in pass 'test_break' after discover\]"):
        PassManager("discover,test_break", check_each=True).run(_ctx())
    PassManager("discover,test_break", check_each=False).run(_ctx())  # unchecked: the broken graph goes on
    PassManager("discover,test_break(false)", check_each=True).run(_ctx())  # a pass that says it changed nothing


BUILT = []


def _base(ctx):
    BUILT.append("base")
    return 1


def _derived(ctx, config):
    BUILT.append(f"derived:{config.select.min_params}")
    return ctx.analysis("test_base") + 1


class KeepDerivedOnly(Pass):
    name = "test_keep_derived"

    def run(self, ctx):
        return PassResult(True, frozenset({"test_derived"}))


def test_an_analysis_is_dropped_with_what_it_requires():
    BUILT.clear()
    ctx = _ctx()
    assert ctx.analysis("test_derived") == 2
    PassManager("test_keep_derived").run(ctx)  # preserves derived, not base: derived must go too
    assert ctx.analysis("test_derived") == 2
    assert BUILT == ["derived:4096", "base", "derived:4096", "base"]


def test_analyses_are_cached_per_config_section_they_declare():
    BUILT.clear()
    ctx = _ctx()
    ctx.analysis("test_derived")
    ctx.analysis("test_derived", select=lrqgraph.SelectConfig(min_params=1))
    ctx.analysis("test_derived")
    assert BUILT == ["derived:4096", "base", "derived:1"]
    with pytest.raises(LrqError, match="does not read config section"):
        ctx.analysis("test_derived", allocate=lrqgraph.AllocateConfig())


def test_pass_parameters_are_validated_when_the_pipeline_is_parsed():
    with pytest.raises(LrqError, match="pass 'lower'.*unknown lowering target 'gpu'"):
        parse_pipeline("discover,factorize,lower(gpu)")
    with pytest.raises(LrqError, match="pass 'allocate'.*unknown option"):
        parse_pipeline("discover,allocate(target_bits=3)")
    with pytest.raises(LrqError, match="pass 'verify'.*unknown option"):
        parse_pipeline("verify(sample=3)")
