"""The pass manager: pipeline strings, registry, analysis caching and invalidation, error messages."""
import pytest

import lrqgraph
from lrqgraph import Context, LrqError, OptimizeConfig, Pass, PassManager, PassResult, register_analysis, register_pass
from lrqgraph.model import ModelState
from lrqgraph.passmanager import PASSES, parse_pipeline

from builders import matmul_model

CALLS = {"count": 0}


@register_analysis("test_counter")
def _counter(ctx):
    CALLS["count"] += 1
    return CALLS["count"]


@register_pass
class ReadCounter(Pass):
    name = "test_read"

    def run(self, ctx):
        ctx.report.setdefault("seen", []).append(ctx.analysis("test_counter"))
        return PassResult(False)


@register_pass
class Touch(Pass):
    name = "test_touch"
    positional = ("keep",)

    def run(self, ctx):
        keep = self.params.get("keep")
        return PassResult(True, frozenset({"test_counter"}) if keep else frozenset())


@register_pass
class Boom(Pass):
    name = "test_boom"

    def run(self, ctx):
        raise ValueError("kaput")


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
    ctx = _ctx()
    PassManager("test_read,test_read,test_touch(true),test_read,test_touch,test_read").run(ctx)
    # computed once, preserved by test_touch(true), recomputed after the plain test_touch
    assert ctx.report["seen"] == [1, 1, 1, 2]


def test_managers_nest_and_time_every_pass():
    ctx = _ctx()
    inner = PassManager("test_read,test_touch")
    result = PassManager([inner, parse_pipeline("test_read")[0]]).run(ctx)
    assert result.modified
    # the inner manager's passes, then the inner manager itself as one pass of the outer one
    assert [p["pass"] for p in ctx.report["passes"]] == ["test_read", "test_touch", "test_read,test_touch",
                                                          "test_read"]
    assert all(p["seconds"] >= 0 for p in ctx.report["passes"])


def test_a_failing_pass_is_named_with_the_passes_before_it():
    with pytest.raises(LrqError, match=r"pass 'test_boom' failed after test_read, test_touch: ValueError: kaput"):
        PassManager("test_read,test_touch,test_boom").run(_ctx())


def test_unknown_pass_option_is_a_clear_error():
    with pytest.raises(LrqError, match="unknown option.*bitz"):
        lrqgraph.run(matmul_model(), passes="discover,factorize(bitz=3)")


def test_check_each_pass_runs_the_checker_after_modifying_passes():
    cfg = OptimizeConfig(check_each_pass=True, select=lrqgraph.SelectConfig(min_params=1))
    result = lrqgraph.run(matmul_model(), cfg, passes="discover,factorize,lower,cleanup")
    assert any(n.op_type == "MatMulNBits" for n in result.model.graph.node)
