"""Parameters of a notebook: inspected with papermill, values checked by type."""

import pytest

from labyard_hub.scheduler.params import ParameterError, inspect_parameters, validate_parameters

from . import notebooks


@pytest.fixture
def specs(tmp_path):
    path = tmp_path / "nb.ipynb"
    notebooks.write(path, notebooks.training())
    return inspect_parameters(path)


def test_types_and_defaults_from_the_parameters_cell(specs):
    assert [(s.name, s.type, s.default) for s in specs] == [
        ("epochs", "int", 1), ("lr", "float", 0.1), ("name", "str", "baseline"), ("layers", "list", [1, 2]), ("verbose", "bool", False),
    ]


def test_valid_values_are_coerced(specs):
    assert validate_parameters(specs, {"epochs": 3, "lr": 1, "layers": "[3, 4]", "verbose": True}) == {
        "epochs": 3, "lr": 1.0, "layers": [3, 4], "verbose": True}


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": "3"}, "parameter 'epochs' must be int, got str"),
    ({"epochs": True}, "parameter 'epochs' must be int, got bool"),
    ({"lr": "fast"}, "parameter 'lr' must be float"),
    ({"verbose": 1}, "parameter 'verbose' must be bool"),
    ({"layers": "[1,"}, "parameter 'layers' must be a list (JSON text is accepted)"),
    ({"layers": {"a": 1}}, "parameter 'layers' must be list, got dict"),
    ({"epoch": 3, "zz": 1}, "unknown parameters 'epoch', 'zz'; the notebook's parameters are: epochs, lr, name, layers, verbose"),
])
def test_wrong_values_are_refused_by_name(specs, values, message):
    with pytest.raises(ParameterError, match=None) as e:
        validate_parameters(specs, values)
    assert message in str(e.value)


def test_notebook_without_parameters_cell(tmp_path):
    nb = notebooks.training()
    nb.cells[1].metadata["tags"] = []
    notebooks.write(tmp_path / "nb.ipynb", nb)
    specs = inspect_parameters(tmp_path / "nb.ipynb")
    assert specs == []
    with pytest.raises(ParameterError, match="no cell tagged 'parameters'"):
        validate_parameters(specs, {"epochs": 3})
