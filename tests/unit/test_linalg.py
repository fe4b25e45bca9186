"""The inverse-Hessian factor: same U as the textbook route (Cholesky, inverse, Cholesky)."""

from __future__ import annotations

import pytest
import torch

from worker.gptq.errors import CholeskyError
from worker.gptq.linalg import _invert_upper, _reverse, inverse_hessian_factor


def hessian(K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * K, K, generator=g) @ (torch.eye(K) + 0.1 * torch.randn(K, K, generator=g))
    return X.t() @ X / K


@pytest.mark.parametrize("K", [1, 7, 128, 300, 1000])
def test_factor_matches_the_textbook_route(K: int) -> None:
    H = hessian(K)
    damped = H.clone()
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    U, damp = inverse_hessian_factor([H], 0.01, 0.01, 1.0)
    assert damp == 0.01 and U.is_contiguous()
    assert torch.equal(U, U.triu())
    assert torch.allclose(U, textbook, rtol=1e-4, atol=1e-5 * float(textbook.abs().max()))
    assert torch.allclose(U.t() @ U @ damped, torch.eye(K), atol=1e-3)


def test_reverse_is_both_flips_in_either_memory_order() -> None:
    A = torch.randn(33, 33)
    expected = A.flip(0, 1)
    row_major = A.clone()
    _reverse(row_major)
    column_major = A.t().contiguous().t()
    _reverse(column_major)
    assert torch.equal(row_major, expected) and torch.equal(column_major, expected)


def test_invert_upper_in_place() -> None:
    R = torch.randn(260, 260).triu() + 30 * torch.eye(260)
    expected = torch.linalg.inv(R)
    _invert_upper(R)
    assert torch.allclose(R, expected, atol=1e-6)


def test_an_indefinite_hessian_is_damped_until_it_factors() -> None:
    H = hessian(64)
    H[5, 5] = -0.5 * float(H.diagonal().mean())  # not positive definite as it stands
    reference = H.clone()
    U, damp = inverse_hessian_factor([H], 0.01, 0.25, 5.0)
    assert damp > 0.01
    damped = reference.clone()
    damped.diagonal().add_(damp * reference.diagonal().mean())
    assert torch.allclose(U.t() @ U @ damped, torch.eye(64), atol=1e-3)


def test_hopeless_hessian_raises() -> None:
    with pytest.raises(CholeskyError, match="damp_percent"):
        inverse_hessian_factor([-torch.eye(8)], 0.01, 0.01, 0.1)
