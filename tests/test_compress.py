"""Pruning (servers/compress.py): exact sparsity patterns, Wanda and SparseGPT against direct
computations of their formulas on one small layer, and a tiny Llama pruned end to end."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from servers.compress import CompressError, Sparsity, magnitude_mask, nm_mask, sparsegpt_prune, wanda_mask  # noqa: E402
from servers.tiny import CORPUS, tiny_llama  # noqa: E402


def test_sparsity_parsing():
    assert Sparsity.parse("2:4") == Sparsity(0.5, 2, 4) and str(Sparsity.parse("4:8")) == "4:8"
    assert Sparsity.parse("0.6") == Sparsity(0.6)
    for bad, msg in (("4:2", "0 < N < M"), ("a:b", "integers"), ("1.5", "between 0 and 1"), ("half", "share of zeros")):
        with pytest.raises(CompressError, match=msg):
            Sparsity.parse(bad)


def test_nm_and_magnitude_masks_exact():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0],
                          [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    m = nm_mask(score, 2, 4)  # the 2 lowest of each group of 4 columns
    assert m.tolist() == [[False, True, False, True, True, True, False, False],
                          [True, True, False, False, True, True, False, False]]
    with pytest.raises(CompressError, match="multiple of M"):
        nm_mask(torch.ones(2, 6), 2, 4)
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -3.0]])
    um = magnitude_mask(w, Sparsity(0.5))  # one threshold for the matrix: the 4 smallest |w|
    assert um.tolist() == [[True, False, True, False], [True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    big = torch.randn(16, 64, generator=g)
    for n, m_ in ((2, 4), (4, 8)):
        mask = magnitude_mask(big, Sparsity(n / m_, n, m_))
        assert (mask.reshape(16, -1, m_).sum(-1) == n).all()


def test_wanda_matches_its_formula():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 8, generator=g)
    X = torch.randn(50, 8, generator=g) * torch.linspace(0.1, 3.0, 8)  # tokens x inputs, unequal scales
    mask = wanda_mask(W, (X**2).mean(0), Sparsity(0.5))
    # direct: S_ij = |W_ij| * ||X_j||_2; in each row the 4 lowest S are pruned
    norms = [sum(float(X[t, j]) ** 2 for t in range(50)) ** 0.5 for j in range(8)]
    for i in range(6):
        s = [abs(float(W[i, j])) * norms[j] for j in range(8)]
        lowest = set(sorted(range(8), key=lambda j: s[j])[:4])
        assert {j for j in range(8) if mask[i, j]} == lowest
    nm = wanda_mask(W, (X**2).mean(0), Sparsity(0.5, 2, 4))
    for i in range(6):
        for g0 in (0, 4):
            s = {j: abs(float(W[i, j])) * norms[j] for j in range(g0, g0 + 4)}
            assert {j for j in range(g0, g0 + 4) if nm[i, j]} == set(sorted(s, key=s.get)[:2])


def _sparsegpt_reference(W, H, ratio=None, nm=None, damp=0.01):
    """Sequential OBS in float64 with explicit inverses: for each column i (left to right), with
    F = {i, ..., d-1} and G = (H_FF)^-1, the pruned weight's error e = w_i / G_ii is spread by
    w_F -= e * G_i,F; the saliency of w_i is w_i^2 / G_ii (SparseGPT's mask rule)."""
    W = W.double().clone()
    H = H.double().clone()
    d = H.shape[0]
    H += torch.eye(d, dtype=H.dtype) * damp * torch.diag(H).mean()
    inv_tail = [torch.linalg.inv(H[i:, i:]) for i in range(d)]
    diag = torch.tensor([inv_tail[i][0, 0] for i in range(d)], dtype=H.dtype)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if ratio is not None:  # one block: the mask is chosen before any update
        sal = W**2 / diag
        k = int(sal.numel() * ratio)
        mask.view(-1)[torch.topk(sal.reshape(-1), k, largest=False).indices] = True
    for i in range(d):
        if nm is not None and i % nm[1] == 0:
            sal = W[:, i : i + nm[1]] ** 2 / diag[i : i + nm[1]]
            idx = torch.topk(sal, nm[0], dim=1, largest=False).indices
            mask[:, i : i + nm[1]] = mask[:, i : i + nm[1]].scatter(1, idx, True)
        G = inv_tail[i]
        for r in range(W.shape[0]):
            if mask[r, i]:
                e = W[r, i] / G[0, 0]
                W[r, i:] -= e * G[0, :]
                W[r, i] = 0.0
    return W, mask


@pytest.mark.parametrize("sp", [Sparsity(0.5), Sparsity(0.5, 2, 4)])
def test_sparsegpt_matches_sequential_obs(sp):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 8, generator=g)
    X = torch.randn(40, 8, generator=g) + 0.5 * torch.randn(40, 1, generator=g)  # correlated inputs
    H = 2 * X.t() @ X / 40
    new, mask = sparsegpt_prune(W, H, sp)
    ref, ref_mask = _sparsegpt_reference(W, H, ratio=None if sp.n else sp.ratio, nm=(sp.n, sp.m) if sp.n else None)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref, atol=1e-4)
    assert (new[mask] == 0).all() and int(mask.sum()) == 20
    # the OBS update beats plain zeroing of the same weights on the calibration inputs
    plain = W.clone()
    plain[mask] = 0
    assert ((new - W) @ X.t()).norm() < ((plain - W) @ X.t()).norm()


def _prune_cli(*args):
    """`python -m servers.compress ARGS`, in-process (its main(); the matrix test runs the real command)."""
    from servers.compress import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


@pytest.mark.parametrize("method,sparsity", [("wanda", "2:4"), ("sparsegpt", "4:8"), ("magnitude", "0.5")])
def test_tiny_llama_pruned_end_to_end(tmp_path, method, sparsity):
    base = tiny_llama(tmp_path / "base")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 20))
    out = tmp_path / "pruned"
    p = _prune_cli(base, out, "--method", method, "--sparsity", sparsity, "--calibration", calib, "--nsamples", "4", "--seqlen", "32")
    assert p.returncode == 0, p.stderr
    recipe = json.loads((out / "evalkit_recipe.json").read_text())
    assert recipe["base"] == {"model": str(base)} and recipe["format"] == "transformers" and recipe["runtime"] == []
    (step,) = recipe["steps"]
    assert step["intervention"] == "compress" and step["name"] == f"{method}-{sparsity}"
    assert step["options"]["method"] == method and step["options"]["sparsity"] == sparsity and step["figures"]["zeros"] > 0
    assert step["figures"]["measured_sparsity"] >= 0.5 * 0.99  # over the decoder blocks' linear layers
    assert step["versions"]["torch"] and step["versions"]["transformers"] == transformers.__version__
    if method != "magnitude":
        assert step["inputs"]["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(base)
    sp = Sparsity.parse(sparsity)
    for (name, mod), (_, ref) in zip(pruned.named_modules(), dense.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        W = mod.weight.detach()
        if ".layers." not in name:  # the LM head stays dense
            assert torch.equal(W, ref.weight.detach()), name
            continue
        zero = W == 0
        if sp.n:
            assert (zero.reshape(W.shape[0], -1, sp.m).sum(-1) >= sp.n).all(), name
        else:
            assert int(zero.sum()) >= int(W.numel() * sp.ratio), name
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert pruned.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)  # still a working checkpoint
    p = _prune_cli(base, out, "--method", method, "--sparsity", sparsity)
    assert p.returncode == 2 and "not empty" in p.stderr


def test_bad_calibration_is_a_clear_error(tmp_path):
    base = tiny_llama(tmp_path / "base")
    p = _prune_cli(base, tmp_path / "o1", "--method", "wanda", "--sparsity", "2:4", "--calibration", tmp_path / "missing.txt")
    assert p.returncode == 2 and "missing.txt not found" in p.stderr
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    p = _prune_cli(base, tmp_path / "o2", "--method", "wanda", "--sparsity", "2:4", "--calibration", short, "--seqlen", "64")
    assert p.returncode == 2 and "fewer than --seqlen 64" in p.stderr
