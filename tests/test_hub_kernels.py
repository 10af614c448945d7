"""Hugging Face's installed ``kernels`` package is imported where a source checkout's ``kernels/`` directory,
first on sys.path, would shadow it (``fusedact._hub_kernels``; transformers >= 5.25 imports it)."""

import sys

from fusedact import _hub_kernels


def test_installed_kernels_package_wins_over_the_checkouts(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HUB = True\n")
    (site / "kernels-0.1.dist-info").mkdir()
    (site / "kernels-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.1\n")
    root = str(_hub_kernels._OURS.parent)
    path = [root, str(site), *sys.path]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    try:
        _hub_kernels.import_installed_kernels()
        assert getattr(sys.modules["kernels"], "HUB", False), sys.modules["kernels"]
        assert sys.path is path and sys.path[0] == root  # (sys.path as it was)
    finally:
        sys.modules.pop("kernels", None)


def test_nothing_happens_where_nothing_shadows(monkeypatch):
    root = str(_hub_kernels._OURS.parent)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if not _hub_kernels._holds_ours(entry)])
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    _hub_kernels.import_installed_kernels()
    assert "kernels" not in sys.modules and root not in sys.path
