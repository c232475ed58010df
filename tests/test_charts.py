"""Charts a reviewer reads: axes that stay within what accuracy can be, counts as whole numbers."""

import pandas as pd

from app.charts import accuracy_vs_size, study_accuracy


def one_point_study() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": ["sosp-h"],
            "target": [0.5],
            "seeds": [1],
            "params_mean": [189_672.5],
            "acc_finetuned_mean": [0.97],
            "acc_finetuned_std": [float("nan")],
        }
    )


def test_a_one_point_study_chart_keeps_accuracy_within_0_and_100_percent():
    fig = study_accuracy(one_point_study(), "params", "acc_finetuned", "params")
    low, high = fig.layout.yaxis.range
    assert 0.0 <= low < 0.97 < high <= 1.006


def test_a_study_chart_writes_its_counts_as_whole_numbers():
    fig = study_accuracy(one_point_study(), "params", "acc_finetuned", "params")
    assert (
        fig.layout.xaxis.tickformat == ",.0f"
        and fig.layout.xaxis.range[0] < 189_672.5 < fig.layout.xaxis.range[1]
    )


def test_an_expand_chart_of_one_near_perfect_trial_stays_below_100_percent():
    table = pd.DataFrame(
        {
            "label": ["plain"],
            "trials": [1],
            "params_mean": [1000.0],
            "test_acc_mean": [0.999],
            "test_acc_std": [0.0],
        }
    )
    assert accuracy_vs_size(table).layout.yaxis.range[1] <= 1.006
