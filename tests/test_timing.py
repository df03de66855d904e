import time

import torch

from persrec.timing import matmul_rate, medians, timed_call


def test_timed_call_separates_wall_from_cpu_time():
    wall, cpu = timed_call(lambda: time.sleep(0.05), torch.device("cpu"))
    assert wall >= 0.05
    assert cpu is not None and cpu < 0.05  # sleeping burns no CPU


def test_medians_of_wall_and_cpu():
    assert medians([(1.0, 0.5), (3.0, 0.1), (2.0, 0.3)]) == (2.0, 0.3)
    assert medians([(1.0, None), (2.0, None)]) == (1.5, None)


def test_matmul_rate_is_positive_on_both_clocks():
    wall, cpu = matmul_rate(torch.device("cpu"), size=64, runs=3)
    assert wall > 0 and cpu is not None and cpu > 0
