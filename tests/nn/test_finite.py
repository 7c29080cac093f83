"""The layers' finite-input check: one reduction when the input is clean, a message that counts and
names the bad rows when it is not, and the transforms the library runs layers under."""

import re

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from moekit import MixtureOfExperts, SparseMoE
from moekit.nn.finite import SHOWN_ROWS, check_finite_rows, check_flag


def test_a_clean_input_is_returned_as_is():
    x = torch.randn(4, 3)
    assert check_finite_rows("Layer", x) is x
    assert check_finite_rows("Layer", torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("dtype, big", [(torch.float16, 6e4), (torch.float32, 1e37)])
def test_finite_values_whose_sum_overflows_are_accepted(dtype, big):
    # 1000 values of 6e4 sum to 6e7 > float16's max 65504: the sum is taken in float32. 1000
    # values of 1e37 sum to 1e40 > float32's max 3.4e38: the sum is inf, the exact test accepts.
    x = torch.full((100, 10), big, dtype=dtype)
    assert check_finite_rows("Layer", x) is x
    x[40, 9] = float("inf")
    with pytest.raises(ValueError, match=re.escape("1 of 100 rows holds NaN or inf: x[40]. ")):
        check_finite_rows("Layer", x)


def test_rows_are_counted_once_however_many_bad_values_they_hold():
    x = torch.zeros(8, 3)
    x[1] = float("nan")  # three bad values, one row
    x[6, 0] = float("-inf")
    with pytest.raises(ValueError, match=re.escape("Layer: x must be finite; 2 of 8 rows hold NaN "
                                                   "or inf: x[1], x[6]. ")):
        check_finite_rows("Layer", x)


def test_the_first_rows_are_named_and_the_rest_elided():
    x = torch.zeros(20, 2)
    x[::2, 1] = float("nan")  # rows 0, 2, ..., 18
    shown = ", ".join(f"x[{r}]" for r in range(0, 2 * SHOWN_ROWS, 2))
    with pytest.raises(ValueError, match=re.escape(f"10 of 20 rows hold NaN or inf: {shown}, ...")):
        check_finite_rows("Layer", x)


def test_a_single_row_input_is_named_x():
    with pytest.raises(ValueError, match=re.escape("1 of 1 rows holds NaN or inf: x. ")):
        check_finite_rows("SparseMoE", torch.tensor([1.0, float("inf")]))


def test_check_flag_refuses_what_is_not_a_bool():
    assert check_flag("Layer", "check_finite", False) is False
    with pytest.raises(TypeError, match=r"Layer: check_finite must be True or False; "
                                        r"got check_finite=None"):
        check_flag("Layer", "check_finite", None)


def test_the_check_runs_under_vmap_over_the_parameters(gen):
    """The replicate engines' reference vmaps the layer's forward over stacked parameters with one
    unbatched input: the check runs there, and refuses a bad row."""
    models = [MixtureOfExperts(3, 1, 2, generator=gen) for _ in range(4)]
    params, buffers = stack_module_state(models)
    template = MixtureOfExperts(3, 1, 2).to("meta")

    def forward(x):
        return vmap(lambda p, b: functional_call(template, (p, b), (x,)).output)(params, buffers)

    x = torch.randn(5, 3, generator=gen)
    assert forward(x).shape == (4, 5, 1)
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("1 of 5 rows holds NaN or inf: x[2]")):
        forward(x)


def test_under_vmap_over_the_input_the_check_is_skipped(gen):
    """A data-dependent check cannot run per sample under vmap (documented in moekit.nn.finite):
    the layer runs, and only the bad sample's output is NaN."""
    moe = MixtureOfExperts(3, 2, 4, generator=gen)
    x = torch.randn(5, 7, 3, generator=gen)
    x[2, 3, 0] = float("nan")
    out = vmap(lambda x_ND: moe(x_ND).output)(x)
    assert out[2, 3].isnan().all() and out.isnan().sum() == 2


@pytest.mark.slow
def test_the_check_refuses_bad_rows_under_torch_compile(gen):
    layer = SparseMoE(16, 4, 2, hidden=32, generator=gen).eval()
    compiled = torch.compile(layer)
    x = torch.randn(24, 16, generator=gen)
    torch.testing.assert_close(compiled(x).output, layer(x).output, rtol=1e-5, atol=1e-5)
    x[5, 1] = float("nan")
    with pytest.raises(ValueError, match=re.escape("SparseMoE: x must be finite; 1 of 24 rows "
                                                   "holds NaN or inf: x[5]")):
        compiled(x)
