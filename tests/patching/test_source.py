"""Reading code (patching.source): the code read is the code that runs, and which value of a variable reaches a
statement and who else reads it - the facts the gated rules' proofs rest on."""

import ast
import functools

import pytest
import torch
from torch import nn

import fusedact
from fusedact.patching import source


def first_function(code: str) -> ast.FunctionDef:
    return ast.parse(code).body[0]


def doubling(function):
    """A wrapper that runs the function it wraps (as transformers' GradientCheckpointingLayer's does)."""

    @functools.wraps(function)
    def wrapper(self, x):
        return 2 * function(self, x)

    return wrapper


IMPLEMENTATIONS = {}


def dispatching(function):
    """A wrapper that may run another implementation instead (as transformers' experts dispatcher)."""

    @functools.wraps(function)
    def wrapper(self, x):
        chosen = IMPLEMENTATIONS.get(type(self).__name__, function)
        return chosen(self, x)

    return wrapper


def mlp(decorator):
    class Decorated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        @decorator
        def forward(self, x):
            return self.act(self.fc(x))

    return Decorated()


def test_a_wrapped_forward_is_read_only_through_a_wrapper_that_runs_it():
    assert source.function_tree(type(mlp(doubling)).forward).name == "wrapper"  # the code that runs
    assert source.forward_tree(type(mlp(doubling))).name == "forward"  # looked through: it runs forward
    assert source.forward_tree(type(mlp(dispatching))) is None  # may run something else: not read
    for decorator, actions in ((doubling, ["fold_bias"]), (dispatching, ["replace"])):
        model = mlp(decorator)
        assert [c.action for c in fusedact.patch(model).changes] == actions
        x = torch.randn(2, 4)
        expected = torch.relu(torch.nn.functional.linear(x, model.fc.weight, model.fc.bias))
        torch.testing.assert_close(model(x), expected * (2 if decorator is doubling else 1))


CODE = """
def f(self, x):
    a = self.one(x)
    b = self.two(x)
    if x:
        b = x
    c = a * b
    a = c
    return a + x
"""


@pytest.mark.parametrize(
    "name,expected", [("a", 0), ("b", None), ("x", None)], ids=["plain", "stored-in-a-branch", "argument"]
)
def test_reaching_definition(name, expected):
    tree = first_function(CODE)
    assert source.reaching_definition(tree.body, 3, name) == expected  # at c = a * b


def test_only_reader_sees_later_reads_and_kills():
    tree = first_function(CODE)
    product = tree.body[3].value
    # a is read by the product, then overwritten before any other read: the product is its only reader
    assert source.only_reader(tree, tree.body, 0, "a", product.left)
    loop = first_function("def f(self, x):\n    for i in x:\n        h = self.one(i)\n        y = h * i\n    return h")
    body = loop.body[0].body
    assert not source.only_reader(loop, body, 0, "h", body[1].value.left)  # read again after the loop
