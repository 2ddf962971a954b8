"""Evaluating the same model again reuses its compiled forward (the trainer's callback and
`vmoe-eval all` evaluate one model many times): one compilation per distinct setting."""

from vmoe_eval import evaluators


def test_a_second_evaluation_does_not_compile_again(trained_run):
    accuracy = evaluators.get_evaluator("accuracy", split="test")
    first = accuracy.evaluate(trained_run)
    misses = evaluators._jitted_output.cache_info().misses
    assert accuracy.evaluate(trained_run) == first
    assert evaluators._jitted_output.cache_info().misses == misses
    other = evaluators.get_evaluator("accuracy", split="test", capacity_factor=0.5)
    other.evaluate(trained_run)
    assert evaluators._jitted_output.cache_info().misses == misses + 1  # a new setting compiles
