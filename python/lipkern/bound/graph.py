"""Reading a model's graph: torch.fx tracing with every op that has a rule as a leaf, one
real forward through the traced graph (so shape reads, sizes and run-time kernel sizes are
concrete), and the hook-based chain reading for models fx cannot trace (only where the model
really is a chain of modules)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from .rules import (FUNCTION_RULES, INDEPENDENT, METHOD_RULES, Call, NoRule, Scale,
                    module_rule)


def _user_constant(constants: Dict[Any, Any], name: str, m: Optional[nn.Module], target):
    for key in (name, target, type(m) if m is not None else None):
        if key is not None and not isinstance(key, (list, dict)):
            try:
                if key in constants:
                    return constants[key]
            except TypeError:
                pass
    return None


class _Tracer(torch.fx.Tracer):
    """Modules with a rule or a user constant are leaves (call_module nodes)."""

    def __init__(self, constants):
        super().__init__()
        self.constants = constants

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_rule(m) is not None or _user_constant(self.constants, qualname, m,
                                                         None) is not None:
            return True
        return super().is_leaf_module(m, qualname) and not list(m.children())


def trace(model: nn.Module, constants) -> Tuple[Optional[torch.fx.Graph], str]:
    """The fx graph of ``model``, or (None, why) when it does not trace. Traced on every
    call, not cached: fx bakes Python attributes (``self.training`` in
    ``F.dropout(..., training=self.training)``, flags, loop counts) into the graph, so a
    cached graph could silently be the wrong one (~20 ms for a ResNet-18)."""
    try:
        return _Tracer(constants).trace(model), ""
    except Exception as e:  # noqa: BLE001 - any tracing failure: try the chain reading
        return None, f"{type(e).__name__}: {e}"


class Plan:
    """What one forward found: per node its term (in graph order) and the layers."""

    def __init__(self):
        self.steps: List[Tuple[Any, Any, List[Any]]] = []  # (node, term, dependent args)
        self.output: Any = None
        self.layers: List[Tuple[str, torch.Tensor, Any]] = []  # (name, weight, spec)
        self.rows: List[Tuple[str, str, Tuple[int, ...], Any]] = []  # (name, kind, shape, term)


def _shape_of(v) -> Tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _make_call(plan: Plan, name, kind, target, args, kwargs, arg_nodes, kwarg_nodes, out,
               is_dep, module=None) -> Call:
    def add_layer(call, weight, spec):
        plan.layers.append((call.name, weight, spec))
        return len(plan.layers) - 1
    return Call(name, kind, target, args, kwargs, arg_nodes, kwarg_nodes, out, is_dep,
                add_layer, module)


def _apply_rule(plan: Plan, call: Call, constants, shape) -> Any:
    user = _user_constant(constants, call.name, call.module, call.target)
    if user is not None:
        call.only() if call.deps() else None
        v = user(call.module, shape) if callable(user) and call.module is not None else (
            user(shape) if callable(user) else user)
        term = Scale(v, note="given")
    else:
        if call.module is not None:
            rule = module_rule(call.module)
        elif call.kind == "call_method":
            rule = METHOD_RULES.get(call.target)
        else:
            rule = FUNCTION_RULES.get(call.target)
        what = call.what()
        if rule is None:
            key = repr(call.name) if call.module is not None else (
                repr(call.target) if call.kind == "call_method" else
                getattr(call.target, "__qualname__", repr(call.target)))
            raise NoRule(
                f"lipschitz_bound: {what} has no Lipschitz rule; give its constant with "
                f"constants={{{key}: value}} (keys: a module's qualified name or type, a "
                f"function, or a method name; a value or callable(module, input_shape))")
        try:
            term = rule(call)
        except NoRule as e:
            msg = str(e)
            raise NoRule(f"lipschitz_bound: {msg}; or give its constant with constants="
                         f"{{{call.name!r}: value}}" if "constants=" not in msg else
                         f"lipschitz_bound: {msg}") from None
    if isinstance(term, Scale) and term.row:
        plan.rows.append((call.name, type(call.module).__name__ if call.module is not None
                          else str(getattr(call.target, "__name__", call.target)), shape,
                          term))
    return term


class _Interpreter(torch.fx.Interpreter):
    """Runs the traced graph on the example input (concrete values for every node) and asks
    each input-dependent node's rule for its term."""

    def __init__(self, gm, plan: Plan, constants):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node already
        self.plan, self.constants = plan, constants
        self.dep: Dict[torch.fx.Node, bool] = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.op == "placeholder":
            self.dep[n] = True
            return out
        if n.op in ("get_attr",):
            self.dep[n] = False
            return out
        deps_in = [a for a in n.all_input_nodes if self.dep.get(a, False)]
        if n.op == "output":
            self.plan.output = n.args[0]
            return out
        if not deps_in:
            self.dep[n] = False
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        call = _make_call(self.plan, n.target if module is not None else n.name, n.op,
                          n.target, args, kwargs, n.args, n.kwargs, out,
                          lambda a: isinstance(a, torch.fx.Node) and self.dep.get(a, False),
                          module)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        term = _apply_rule(self.plan, call, self.constants, _shape_of(first))
        self.dep[n] = term is not INDEPENDENT
        if term is not INDEPENDENT:
            self.plan.steps.append((n, term, call.deps()))
        return out


def read_fx(model: nn.Module, gm: torch.fx.Graph, inputs: tuple, constants) -> Plan:
    plan = Plan()
    graph_module = torch.fx.GraphModule(model, gm)
    with torch.no_grad():
        _Interpreter(graph_module, plan, constants).run(*inputs)
    outs = plan.output
    if not isinstance(outs, torch.fx.Node):
        raise ValueError("lipschitz_bound: the model must return one tensor")
    return plan


def read_chain(model: nn.Module, inputs: tuple, constants, why: str) -> Plan:
    """Leaf modules in call order, accepted only if each module's input IS the previous
    module's output (the same tensor object), the first takes the model input and the last
    gives the model output: then the model is the composition of its modules and the
    product of their constants bounds it. Anything else (residual paths, scalings or
    functions between modules) is an error: the chain reading would miss it."""
    records: List[Tuple[str, nn.Module, tuple, dict, Any]] = []
    handles = []
    for name, m in model.named_modules():
        leaf = module_rule(m) is not None or _user_constant(constants, name, m, None) is not None
        if name and (leaf or not list(m.children())):
            def hook(mod, args, kwargs, output, _name=name):
                records.append((_name, mod, args, kwargs, output))
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    # nested leaves (a module with a rule holding children) record inner calls first: keep
    # the outermost ones
    names = [r[0] for r in records]
    records = [r for r in records if not any(r[0].startswith(o + ".") for o in names)]
    fail = (f"lipschitz_bound: torch.fx cannot trace this model ({why}), and it is not a "
            f"chain of modules")
    if not records or len(inputs) != 1 or records[0][2][:1] != () and \
            records[0][2][0] is not inputs[0]:
        raise ValueError(f"{fail}: its first module does not take the model input; make the "
                         f"forward traceable (torch.fx) or give the whole model's constant")
    for prev, cur in zip(records, records[1:]):
        if len(cur[2]) != 1 or cur[3] or cur[2][0] is not prev[4]:
            raise ValueError(f"{fail}: module {cur[0]!r} does not take the output of "
                             f"{prev[0]!r} (residual paths, functions or scalings between "
                             f"modules would be missed); make the forward traceable")
    if out is not records[-1][4]:
        raise ValueError(f"{fail}: the model's output is not its last module's output "
                         f"({records[-1][0]!r}); make the forward traceable")
    plan = Plan()
    prev = "input"
    for name, m, args, kwargs, output in records:
        call = _make_call(plan, name, "call_module", name, args, kwargs, ("x",), {}, output,
                          lambda a: a == "x", m)
        term = _apply_rule(plan, call, constants, _shape_of(args[0]))
        plan.steps.append((name, term, [prev]))
        prev = name
    plan.output = prev
    return plan
