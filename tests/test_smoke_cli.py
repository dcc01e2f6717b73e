from conftest import run_cli


def test_unknown_zoo_model_is_bad_input():
    r = run_cli("prune", "zoo:nope", "--data", "digits", "--sparsity", "0.5", "--out", "x.pt")
    assert r.code == 2
    assert "unknown zoo model" in r.stderr and "Traceback" not in r.stderr
