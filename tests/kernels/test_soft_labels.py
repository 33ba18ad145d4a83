"""soft_labels: the formula, rows summing to 1 (with and without smoothing), label range errors."""
import pytest
import torch

from kernel_testing import assert_close, generator

from onlineaug.kernels import soft_labels, soft_labels_reference


def sample_inputs(device, b=9, k=3, num_classes=10, seed=0):
    g = generator(device, seed)
    labels = torch.randint(0, num_classes, (b, k), generator=g, device=device)
    labels[0] = 4  # repeated label: weights add up
    weights = torch.rand(b, k, generator=g, device=device)
    return labels, weights / weights.sum(dim=1, keepdim=True)


def formula(labels, weights, num_classes, smoothing):
    """t[b, c] = (1 - smoothing) * sum_j w[b, j] [labels[b, j] == c] + smoothing / K, one entry at a time."""
    rows = []
    for row_labels, row_weights in zip(labels.cpu().tolist(), weights.cpu().tolist()):
        rows.append([(1 - smoothing) * sum(w for l, w in zip(row_labels, row_weights) if l == c)
                     + smoothing / num_classes for c in range(num_classes)])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_rows_sum_to_one_and_match_formula(device, smoothing):
    labels, weights = sample_inputs(device)
    target = soft_labels(labels, weights, 10, smoothing=smoothing)
    assert target.shape == (9, 10) and target.dtype == torch.float32 and target.device == labels.device
    assert_close(target.sum(dim=1), torch.ones(9, device=device))
    assert_close(target.cpu(), formula(labels, weights, 10, smoothing))
    expected = torch.full((10,), smoothing / 10)
    expected[4] += 1 - smoothing  # row 0: all weight on class 4
    assert_close(target[0].cpu(), expected)


def test_two_label_mix(device):
    labels = torch.tensor([[2, 0]], device=device)
    weights = torch.tensor([[0.7, 0.3]], device=device)
    assert_close(soft_labels(labels, weights, 3).cpu(), torch.tensor([[0.3, 0.0, 0.7]]))
    assert_close(soft_labels(labels, weights, 3, smoothing=0.3).cpu(),
                 torch.tensor([[0.3 * 0.7 + 0.1, 0.1, 0.7 * 0.7 + 0.1]]))


def test_low_precision_weights_are_accumulated_in_fp32(device):
    labels, weights = sample_inputs(device)
    target = soft_labels(labels, weights.to(torch.bfloat16), 10)
    assert target.dtype == torch.float32
    assert_close(target, soft_labels_reference(labels, weights.to(torch.bfloat16), 10))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (lambda l, w: (torch.tensor([[0, 12]], device=l.device), torch.ones(1, 2, device=l.device), 10), {},
         ValueError, r"label 12 \(labels\[0, 1\]\) is out of range for num_classes=10"),
        (lambda l, w: (torch.tensor([[-1]], device=l.device), torch.ones(1, 1, device=l.device), 10), {},
         ValueError, r"label -1 .* is out of range for num_classes=10"),
        (lambda l, w: (l, w, 0), {}, ValueError, r"num_classes must be a positive int, got 0"),
        (lambda l, w: (l, w, 10.0), {}, ValueError, r"num_classes must be a positive int, got 10.0"),
        (lambda l, w: (l, w, 10), {"smoothing": 1.5}, ValueError, r"smoothing must be a float in \[0, 1\]"),
        (lambda l, w: (l.to(torch.int32), w, 10), {}, TypeError, r"labels has dtype torch.int32, expected torch.int64"),
        (lambda l, w: (l[:, 0], w, 10), {}, ValueError, r"labels has shape \(9,\), expected \(B, k\)"),
        (lambda l, w: (l, w[:, :2], 10), {}, ValueError, r"weights has shape \(9, 2\), expected \(B, k\) = \(9, 3\)"),
        (lambda l, w: (l, w.to(torch.int64), 10), {}, TypeError, r"weights has dtype torch.int64"),
        (lambda l, w: (l, w.to("meta"), 10), {}, ValueError, r"weights is on meta but labels is on"),
        (lambda l, w: (l, w, 10), {"backend": "triton"}, ValueError, r"no Triton kernel for soft_labels"),
        (lambda l, w: (l, w, 10), {"backend": "tpu"}, ValueError, r"backend='tpu' is not one of"),
    ],
)
def test_bad_input(device, args, kwargs, error, match):
    labels, weights = sample_inputs(device)
    with pytest.raises(error, match=match):
        soft_labels(*args(labels, weights), validate=True, **kwargs)
