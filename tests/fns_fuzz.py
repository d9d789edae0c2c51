"""do() functions for test_fuzz.py; top level and light to import, for every start method."""


def echo(batch):
    """Each item's result is its own value: what went in must come back, item for item."""
    return {k: list(vs) for k, vs in batch.items()}
