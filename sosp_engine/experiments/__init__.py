"""Experiments on top of analyses: training (one or several processes), procedures, studies, sensitivity,
comparisons, bottlenecks."""
