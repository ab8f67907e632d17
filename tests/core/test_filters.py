"""The one Gaussian blur (saliencykit.filters) against its definition: a per-channel 2-D
convolution with the outer product of the normalised 1-D kernel, zero or replicate padding.
The reference is built independently with torch's conv2d on a float64 input, so the band-matrix
products must agree to float64 round-off (1e-12)."""
import math

import pytest
import torch
import torch.nn.functional as F

from saliencykit.filters import band, gaussian_blur, gaussian_kernels


def reference_blur(x, sigma, radius, padding):
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k, k)
    k2 = k2 / k2.sum()
    c = x.shape[1]
    w = k2.view(1, 1, *k2.shape).repeat(c, 1, 1, 1)
    if padding == "replicate":
        return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), w, groups=c)
    return F.conv2d(x, w, padding=radius, groups=c)


@pytest.mark.parametrize("padding", ["zeros", "replicate"])
@pytest.mark.parametrize("sigma,radius", [(0.7, 3), (2.0, None), (5.0, 5), (3.0, 12)])
def test_blur_equals_the_2d_convolution(padding, sigma, radius):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 23, generator=g, dtype=torch.float64)
    r = math.ceil(4 * sigma) if radius is None else radius
    if r >= 17 and padding == "replicate":
        pytest.skip("replicate padding wider than the image is not defined by F.pad")
    ours = gaussian_blur(x, sigma, radius=radius, padding=padding)
    torch.testing.assert_close(ours, reference_blur(x, sigma, r, padding), rtol=0, atol=1e-12)


def test_blur_keeps_constants_under_replicate_padding_and_mass_inside_under_zeros():
    # replicate padding: a constant image stays constant (no dark border); zero padding: the
    # kernel is normalised, so the interior of a constant image is unchanged and the border darkens
    x = torch.full((1, 1, 12, 12), 3.0, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(x, 2.0, padding="replicate"), x, rtol=0, atol=1e-12)
    z = gaussian_blur(x, 1.0, radius=2)
    assert torch.allclose(z[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2]) and float(z[0, 0, 0, 0]) < 3.0


def test_zero_sigma_is_a_copy_and_the_kernel_is_normalised():
    x = torch.randn(1, 2, 5, 5)
    out = gaussian_blur(x, 0.0)
    assert torch.equal(out, x) and out is not x
    k, dk = gaussian_kernels(1.3, 6, torch.float64)
    assert abs(float(k.sum()) - 1) < 1e-15 and abs(float(dk.sum())) < 1e-14  # d/dsigma of a constant sum
    rows = band(k, 20).sum(1)  # interior rows hold the whole kernel, edge rows lose the taps outside
    assert torch.allclose(rows[6:-6], torch.ones(8, dtype=torch.float64)) and float(rows[0]) < 1
    assert torch.allclose(band(k, 20, "replicate").sum(1), torch.ones(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="padding"):
        band(k, 9, padding="reflect")
