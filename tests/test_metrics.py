import pytest
import torch

from ltbench.config import GroupsConfig
from ltbench.data.lt import lt_counts
from ltbench.metrics import (
    class_groups,
    confusion_matrix,
    expected_calibration_error,
    group_accuracy,
    per_class_accuracy,
    summarize,
)


def test_per_class_accuracy_and_absent_class():
    target = torch.tensor([0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    assert per_class_accuracy(pred, target, 3) == [50.0, 50.0, None]


def test_count_rule_on_cifar100lt_gives_35_35_30():
    g = class_groups(GroupsConfig(rule="counts"), lt_counts(500, 100, 100))
    assert [len(g[k]) for k in ("many", "medium", "few")] == [35, 35, 30]


def test_count_rule_on_cifar10lt_has_no_tail():
    g = class_groups(GroupsConfig(rule="counts"), lt_counts(5000, 10, 100))
    assert [len(g[k]) for k in ("many", "medium", "few")] == [8, 2, 0]


def test_count_rule_boundaries():
    # many is strictly above 100, few strictly below 20
    g = class_groups(GroupsConfig(rule="counts"), [101, 100, 20, 19])
    assert g == {"many": [0], "medium": [1, 2], "few": [3]}


def test_thirds_by_frequency_rank_not_index():
    g = class_groups(GroupsConfig(rule="thirds"), [5, 50, 500, 1, 10, 100, 7])
    assert g["many"] == [1, 2, 5] and g["medium"] == [4, 6] and g["few"] == [0, 3]


def test_explicit_classes():
    g = class_groups(GroupsConfig(rule="classes", many=[0, 1, 2], medium=[3, 4, 5, 6], few=[7, 8, 9]), [1] * 10)
    assert g["medium"] == [3, 4, 5, 6]


def test_empty_group_is_none_not_zero():
    acc = group_accuracy([50.0, 100.0], {"many": [0, 1], "medium": [], "few": []})
    assert acc == {"many": 75.0, "medium": None, "few": None}


def test_summarize_group_is_mean_of_per_class():
    # class 0: 4 test images all right; class 1: 1 image wrong -> many = mean(100, 0) = 50, top1 = 80
    target = torch.tensor([0, 0, 0, 0, 1])
    pred = torch.tensor([0, 0, 0, 0, 0])
    s = summarize(pred, target, [200, 150], GroupsConfig(rule="counts"))
    assert s["top1"] == pytest.approx(80.0)
    assert s["many"] == pytest.approx(50.0)
    assert s["medium"] is None and s["few"] is None
    assert s["group_sizes"] == {"many": 2, "medium": 0, "few": 0}


def ece_direct(probs, target, bins=15):
    """ECE as Guo et al. 2017 define it, written out bin by bin: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            acc = (pred[in_bin] == target[in_bin]).double().mean()
            total += in_bin.double().mean() * abs(acc - conf[in_bin].double().mean())
    return 100.0 * float(total)


def test_ece_against_its_definition():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 7, generator=g) * 2, 1)
    target = torch.randint(0, 7, (500,), generator=g)
    assert expected_calibration_error(probs, target) == pytest.approx(ece_direct(probs, target), abs=1e-9)
    # perfectly confident and right: 0; confident and always wrong: 100
    onehot = torch.nn.functional.one_hot(target, 7).float()
    assert expected_calibration_error(onehot, target) == pytest.approx(0.0)
    assert expected_calibration_error(onehot, (target + 1) % 7) == pytest.approx(100.0)
    assert expected_calibration_error(probs[:0], target[:0]) is None


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 0, 2, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_classification_summary_has_ece_per_group():
    from ltbench.config import GroupsConfig
    from ltbench.tasks import as_stats
    from ltbench.tasks.classification import Classification, ClassificationConfig

    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(90, 3, generator=g), torch.arange(90) % 3
    s = Classification(ClassificationConfig()).evaluate(
        logits, target, as_stats([300, 50, 5]), GroupsConfig(rule="counts")
    )
    probs = logits.softmax(1)
    assert s["ece"] == pytest.approx(ece_direct(probs, target))
    assert s["ece_groups"]["few"] == pytest.approx(ece_direct(probs[target == 2], target[target == 2]))
    assert s["group_sizes"] == {"many": 1, "medium": 1, "few": 1}
