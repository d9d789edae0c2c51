"""Fuzzing with hypothesis: bad options and items of every type get a clear error at the call
that made them, and no accepted item is lost (SPEC.md guarantees 1 and 3).

Item properties run many examples through one long-lived Batcher (starting workers is the
expensive part); an example that fails retires that Batcher, so a broken one cannot fail the
examples hypothesis tries after it while it shrinks.
"""

import contextlib
import inspect
import logging
import math
import pickle
import re
import threading
import time
from collections import Counter

import psutil
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import mpbatch
from tests import fns_fuzz
from tests.conftest import HELPERS, cmdline

ROUTINGS = ("least-loaded", "key", "round-robin")  # SPEC.md
START_METHODS = ("fork", "spawn", "forkserver", "zygote")
FLUSH_LIMIT = 30.0  # seconds; flush() of a few small items takes milliseconds
# A passing run takes seconds; a failing one restarts the Batcher for each failing example
# hypothesis tries while it shrinks (a broken Batcher may have lost items), which takes longer.
SHRINK_TIMEOUT = 600
# No explain phase: it re-runs the failing example hundreds of times, a Batcher start each.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
NAN = float("nan")
INF = float("inf")


def _weighted(*choices):
    """One of the strategies, in the given proportions: ``(3, good), (1, bad)``.

    ``st.one_of`` flattens nested ``one_of``s and picks among all their branches, so a
    small strategy beside a big ``one_of`` would be drawn far less often than it reads.
    """
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda s: s)


# -- constructor options ---------------------------------------------------------------------

# Batcher's options by kind; the extras past SPEC_OPTIONS are used where the signature has them.
INT_OPTIONS = {"size": False, "buffer": False, "max_attempts": False,  # name -> optional
               "max_bytes": True, "workers": True, "max_batches_per_worker": True, "max_rss": True}
SECONDS_OPTIONS = {"interval": (True, False), "timeout": (True, True),  # (positive, optional)
                   "retry_backoff": (False, False)}
CALLABLE_OPTIONS = ("on_result", "on_dead_letter", "init")
CHOICE_OPTIONS = {"routing": (ROUTINGS, False), "start_method": (START_METHODS, True)}
BOOL_OPTIONS = ("isolate_poison",)
SPEC_OPTIONS = {"size", "max_bytes", "interval", "workers", "buffer", "routing", "max_attempts",
                "retry_backoff", "timeout", "on_result", "on_dead_letter", "init", "start_method"}
PARAMETERS = set(inspect.signature(mpbatch.Batcher).parameters)

HUGE_INTS = [10**400, -10**400, 2**63, 2**64, -2**63, 10**30]  # repr() fits in 4300 digits
EDGE_FLOATS = [0.0, -0.0, NAN, INF, -INF, 1e300, -1e300, 1e-300, 5e-324, 1e10]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(HUGE_INTS), st.floats(),
    st.sampled_from(EDGE_FLOATS), st.text(max_size=8), st.binary(max_size=4),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                         max_size=1),
)
INT_EDGES = [0, -1, 2**63, 10**400, -10**400, 1.0, True]
SECONDS_EDGES = [0, -0.0, NAN, INF, -INF, 1e300, 5e-324, 10**400, -10**400, 1e10]
CALLABLES = st.sampled_from([fns_fuzz.echo, print, dict, lambda *a: None, str.upper])


def _option_strategies():
    """name -> (good values, bad or edge values: edge cases and junk)."""
    out = {"do": (st.one_of(st.just(fns_fuzz.echo), CALLABLES), JUNK)}
    for name, optional in INT_OPTIONS.items():
        good = st.integers(1, 10**6)
        out[name] = (st.one_of(good, st.none()) if optional else good, st.sampled_from(INT_EDGES))
    for name, (_, optional) in SECONDS_OPTIONS.items():
        good = st.one_of(st.floats(0.001, 100.0), st.integers(1, 10))
        out[name] = (st.one_of(good, st.none()) if optional else good,
                     st.sampled_from(SECONDS_EDGES))
    for name in CALLABLE_OPTIONS:
        out[name] = (st.one_of(CALLABLES, st.none()), JUNK)
    for name, (choices, optional) in CHOICE_OPTIONS.items():
        good = st.sampled_from(choices + ((None,) if optional else ()))
        out[name] = (good, st.one_of(st.text(max_size=12), JUNK))
    for name in BOOL_OPTIONS:
        out[name] = (st.booleans(), JUNK)
    return {name: (good, _weighted((1, odd), (1, JUNK)))
            for name, (good, odd) in out.items() if name in PARAMETERS}


def _merged(options, odd_options):
    return {**options, **odd_options}


OPTION_STRATEGIES = _option_strategies()
# Good options, and up to two drawn from edge cases and junk: one odd option at a time shows
# each check on its own (an earlier bad option would mask it), two that either may be named.
OPTIONS = st.tuples(
    st.fixed_dictionaries({"do": OPTION_STRATEGIES["do"][0]},
                          optional={n: good for n, (good, _) in OPTION_STRATEGIES.items()
                                    if n != "do"}),
    st.lists(st.sampled_from(sorted(OPTION_STRATEGIES)), max_size=2, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: OPTION_STRATEGIES[n][1] for n in names})),
).map(lambda pair: _merged(*pair))


def _expected(name, value):
    """What the constructor must do with one option: "ok", TypeError, ValueError, or "edge"
    (a huge value: taking it or refusing it with ValueError are both fine)."""
    if name in INT_OPTIONS:
        if value is None and INT_OPTIONS[name]:
            return "ok"
        if isinstance(value, bool) or not isinstance(value, int):
            return TypeError
        return ValueError if value < 1 else "edge" if value > 2**62 else "ok"
    if name in SECONDS_OPTIONS:
        positive, optional = SECONDS_OPTIONS[name]
        if value is None and optional:
            return "ok"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return TypeError
        if isinstance(value, float) and not math.isfinite(value):
            return ValueError
        if value < 0 or (positive and value == 0):
            return ValueError
        return "edge" if value > 1e9 else "ok"  # ~31 years: a library may cap it
    if name in CHOICE_OPTIONS:
        choices, optional = CHOICE_OPTIONS[name]
        if value is None and optional:
            return "ok"
        if not isinstance(value, str):
            return TypeError
        return "ok" if value in choices else ValueError
    if name in BOOL_OPTIONS:
        return "ok" if isinstance(value, bool) else TypeError
    # do and the callbacks
    if value is None and name != "do":
        return "ok"
    return "ok" if callable(value) else TypeError


def _names(name, value, message):
    """The message names the option and shows the value (its repr, or at least its type)."""
    if not re.search(rf"\b{name}\b", message):
        return False
    return repr(value) in message or type(value).__name__ in message


def _call(fn, *args, **kwargs):
    """(what ``fn`` returned, None) or (None, what it raised): the test judges either."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:
        return None, exc


def _our_children():
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True)
            if not any(h in cmdline(p) for h in HELPERS)}


@settings(max_examples=200, deadline=None)
@given(options=OPTIONS)
@example(options={"do": fns_fuzz.echo, "size": 1, "max_bytes": 1, "interval": 1e-300,
                  "workers": 1, "buffer": 1, "routing": "key", "max_attempts": 1,
                  "retry_backoff": 0, "timeout": 5e-324, "on_result": print,
                  "on_dead_letter": print, "init": dict, "start_method": "spawn"})
@example(options={"do": fns_fuzz.echo, "interval": 1e300})  # finite, but not in nanoseconds
@example(options={"do": fns_fuzz.echo, "timeout": 10**400})  # an int no float can hold
@example(options={"do": fns_fuzz.echo, "retry_backoff": -(10**400)})
@example(options={"do": fns_fuzz.echo, "size": 10**400, "buffer": 2**63, "interval": NAN})
def test_constructor_takes_good_options_and_names_bad_ones(options):
    assert SPEC_OPTIONS <= PARAMETERS
    options = dict(options)
    do = options.pop("do")
    verdicts = {name: _expected(name, value) for name, value in {"do": do, **options}.items()}
    bad = {n for n, v in verdicts.items() if v in (TypeError, ValueError)}
    edge = {n for n, v in verdicts.items() if v == "edge"}
    values = {"do": do, **options}
    children = _our_children()
    b, exc = _call(mpbatch.Batcher, do, **options)
    if exc is not None:
        assert isinstance(exc, TypeError | ValueError), (
            f"Batcher(**{values!r}) raised {type(exc).__name__} (only TypeError or ValueError "
            f"may): {exc}")
        message = str(exc)
        assert bad or edge, f"refused good options with {exc!r}"
        named = [n for n in bad | edge if _names(n, values[n], message)]
        assert named, (f"{type(exc).__name__}: {message!r} names none of the bad options "
                       f"{sorted(bad | edge)} with its value")
        kinds = {verdicts[n] if n in bad else ValueError for n in named}
        assert any(isinstance(exc, kind) for kind in kinds), (
            f"{type(exc).__name__} for {named}; expected {[k.__name__ for k in kinds]}")
        return
    try:
        assert not bad, f"accepted bad options {sorted(bad)}"
        assert b.stats().workers == 0
        assert _our_children() == children, "construction started processes"
    finally:
        b.close()


# -- items -----------------------------------------------------------------------------------

def _lambda():
    return lambda: 1


def _generator():
    return (i for i in range(3))


def _local_instance():
    class Local:
        pass

    return Local()


def _cyclic():
    value = [1]
    value.append(value)
    return value


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                    st.binary(max_size=16))
KEY_LEAVES = _weighted(
    (3, st.text(max_size=12)), (2, st.integers()), (1, st.binary(max_size=16)), (1, st.none()),
    (1, st.floats()), (1, st.sampled_from([10**30, -(2**63), 2**64])),
    (1, st.sampled_from([0, False, 0.0, -0.0, 1, True, 1.0])),  # equal keys, different types
    (1, st.sampled_from([NAN, INF, -INF])))
GOOD_KEYS = st.recursive(
    KEY_LEAVES,
    lambda inner: st.one_of(st.tuples(inner), st.tuples(inner, inner),
                            st.frozensets(inner, max_size=2)),
    max_leaves=4)
UNHASHABLE_KEYS = st.one_of(
    st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
    st.sets(st.integers(), max_size=2), st.tuples(st.text(max_size=3), st.lists(SCALARS)))
UNPICKLABLE = st.one_of(st.builds(threading.Lock), st.builds(_lambda), st.builds(_generator),
                        st.builds(_local_instance))
UNPICKLABLE_KEYS = st.one_of(UNPICKLABLE, st.tuples(st.text(max_size=3), UNPICKLABLE))
BIG = st.integers(1_000, 200_000).map(lambda n: b"\x5a" * n)
GOOD_VALUES = st.one_of(
    st.recursive(SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=8),
    BIG, st.builds(_cyclic))
BAD_VALUES = st.one_of(UNPICKLABLE, st.builds(lambda good, bad: [good, {"x": bad}],
                                              GOOD_VALUES, UNPICKLABLE))
KEYS = _weighted((6, GOOD_KEYS), (1, UNHASHABLE_KEYS), (1, UNPICKLABLE_KEYS))
VALUES = _weighted((4, GOOD_VALUES), (1, BAD_VALUES))
ITEMS = st.tuples(KEYS, VALUES)
NOT_PAIRS = st.sampled_from([7, None, (1, 2, 3), ("only-a-key",)])
OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["add", "submit"]), ITEMS),
    st.tuples(st.just("add_many"), st.lists(_weighted((8, ITEMS), (1, NOT_PAIRS)),
                                            max_size=6), st.booleans()),
), min_size=1, max_size=6)

VARIANTS = [  # Batcher options, on top of echo and 2 workers
    pytest.param({"on_result": True}, id="least-loaded"),
    pytest.param({"max_bytes": 1000}, id="max_bytes"),
    pytest.param({"routing": "key", "on_result": True}, id="key"),
]
ITEM_SETTINGS = settings(max_examples=60, deadline=None, phases=PHASES,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])


def _same(a, b):
    """Equal, with nan equal to nan and cycles allowed: same type and same repr."""
    return type(a) is type(b) and repr(a) == repr(b)


def _verdict(item, max_bytes):
    """What add() must do with an item: "ok" or the reason to refuse it."""
    try:
        key, value = item
    except (TypeError, ValueError):
        return "not a pair"
    try:
        hash(key)
    except TypeError:
        return "unhashable"
    try:
        blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        pickle.dumps(key, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return "unpicklable"
    if max_bytes is not None and len(blob) > max_bytes:
        return "too large"
    return "ok"


def _check_refusal(exc, verdict, item, index, max_bytes, call):
    """The error of a refused item names what was wrong with it."""
    text = str(exc)
    got = f"{call} raised {type(exc).__name__}: {text!r}"
    if verdict == "ok":
        pytest.fail(f"{got} for a good item {item!r:.200}")
    if verdict == "not a pair":
        assert isinstance(exc, TypeError) and f"item {index}" in text, got
        return
    key = item[0]
    if verdict == "unhashable":
        assert isinstance(exc, TypeError) and not isinstance(exc, mpbatch.SerializationError), got
        assert "key must be hashable" in text and type(key).__name__ in text, got
    elif verdict == "unpicklable":
        assert isinstance(exc, mpbatch.SerializationError), got
        assert repr(key)[:80] in text, f"{got}: the key {key!r:.80} is not named"
    else:
        assert isinstance(exc, mpbatch.ItemTooLarge), got
        assert repr(key)[:80] in text and f"max_bytes={max_bytes}" in text, got


class ErrorLog(logging.Handler):
    """ERROR records of the "mpbatch" logger: the collector logs what it failed to handle."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.texts = []

    def emit(self, record):
        self.texts.append(self.format(record))


class Reused:
    """One Batcher used across hypothesis examples; replaced after an example fails."""

    def __init__(self, options):
        self.options = dict(options)
        self.max_bytes = self.options.get("max_bytes")
        if self.options.get("on_result"):
            self.options["on_result"] = self._on_result
        self.batcher = None
        self.calls = []  # (values, results) of each on_result call
        self.errors = ErrorLog()
        logging.getLogger("mpbatch").addHandler(self.errors)

    def _on_result(self, key, values, results):
        self.calls.append((values, results))

    def get(self):
        if self.batcher is None:
            self.batcher = mpbatch.Batcher(fns_fuzz.echo, **{"workers": 2, **self.options})
        self.calls.clear()
        self.errors.texts.clear()
        return self.batcher

    def retire(self):
        """Drop a Batcher an example failed on; it may have lost items, so do not wait."""
        b, self.batcher = self.batcher, None
        if b is not None:
            with contextlib.suppress(Exception):
                b.close(timeout=0.05)

    def close(self):
        logging.getLogger("mpbatch").removeHandler(self.errors)
        b, self.batcher = self.batcher, None
        if b is not None:
            b.close(timeout=FLUSH_LIMIT)
            assert b.stats().pending == 0, f"items left after close(): {b.stats()}"

    def run(self, check, *args):
        """``check(self, batcher, *args)`` for one example; a failure retires the Batcher."""
        b = self.get()
        try:
            return check(self, b, *args)
        except BaseException:
            self.retire()
            raise

    def flush(self, b):
        """flush(), failing fast (not at the test's timeout) when the collector hit a bug."""
        done, raised = threading.Event(), []

        def flush():
            try:
                b.flush()
            except BaseException as exc:
                raised.append(exc)
            finally:
                done.set()

        threading.Thread(target=flush, name="fuzz-flush", daemon=True).start()
        limit = time.monotonic() + FLUSH_LIMIT
        while not done.wait(0.01):
            assert not self.errors.texts, (
                "the collector logged while flush() waited (an item it failed to settle keeps "
                "flush() waiting forever):\n" + "\n".join(self.errors.texts))
            assert time.monotonic() < limit, f"flush() took over {FLUSH_LIMIT}s: {b.stats()}"
        if raised:
            raise raised[0]
        assert not self.errors.texts, "the collector logged:\n" + "\n".join(self.errors.texts)


@pytest.fixture
def reused():
    """Reused(options), one per options for the whole test (all its examples)."""
    made = {}

    def get(**options):
        key = repr(sorted(options.items()))
        if key not in made:
            made[key] = Reused(options)
        return made[key]

    yield get
    for holder in made.values():
        holder.close()


def _feed(holder, b, op, accepted, futures):
    """Apply one op; returns how many items it accepted (recorded in accepted/futures)."""
    if op[0] in ("add", "submit"):
        item = op[1]
        verdict = _verdict(item, holder.max_bytes)
        fut, exc = _call(b.add if op[0] == "add" else b.submit, *item)
        if exc is not None:
            _check_refusal(exc, verdict, item, 0, holder.max_bytes, f"{op[0]}()")
            return 0
        assert verdict == "ok", f"{op[0]}() accepted an item to refuse ({verdict}): {item!r:.200}"
        accepted.append(item[1])
        if fut is not None:
            futures.append((fut, item))
        return 1
    _, items, as_iterator = op
    verdicts = [_verdict(item, holder.max_bytes) for item in items]
    bad = next((j for j, v in enumerate(verdicts) if v != "ok"), len(items))
    n, exc = _call(b.add_many, iter(items) if as_iterator else items)
    if exc is not None:
        assert bad < len(items), f"add_many() raised {exc!r} for good items"
        _check_refusal(exc, verdicts[bad], items[bad], bad, holder.max_bytes, "add_many()")
        if isinstance(exc, mpbatch.SerializationError | mpbatch.Full):
            assert exc.accepted == bad, f"{exc!r}: .accepted is {exc.accepted}, not {bad}"
        accepted.extend(value for _, value in items[:bad])
        return bad
    assert bad == len(items), f"add_many() accepted item {bad} ({verdicts[bad]})"
    assert n == len(items)
    accepted.extend(value for _, value in items)
    return n


def _check_ops(holder, b, ops):
    before = b.stats()
    accepted, futures = [], []
    for op in ops:
        was = b.stats().accepted
        n = _feed(holder, b, op, accepted, futures)
        grew = b.stats().accepted - was
        assert grew == n, f"accepted grew by {grew}, not {n}, after {op!r:.200}"
    holder.flush(b)
    for fut, item in futures:
        assert fut.done(), f"flush() returned before the future of {item!r:.200} resolved"
        assert _same(fut.result(), item[1]), f"{fut.result()!r:.200} came back for {item!r:.200}"
    if "on_result" in holder.options:
        seen = [v for values, _ in holder.calls for v in values]
        assert Counter(map(repr, seen)) == Counter(map(repr, accepted)), "on_result values"
        for values, results in holder.calls:
            assert _same(results, values)
    after = b.stats()
    assert after.accepted == after.succeeded + after.dead_lettered + after.pending
    assert after.pending == 0, after
    assert after.accepted - before.accepted == len(accepted), (before, after)
    assert after.succeeded - before.succeeded == len(accepted), (before, after)
    assert after.dead_lettered == before.dead_lettered, b.dead_letters()[-1:]


@pytest.mark.timeout(SHRINK_TIMEOUT)
@pytest.mark.parametrize("variant", VARIANTS)
@ITEM_SETTINGS
@given(ops=OPS)
@example(ops=[("submit", (NAN, None)), ("add", ((NAN, "a"), 1))])  # nan != nan, even as a key
@example(ops=[("add", (1, "int")), ("submit", (True, "bool")), ("submit", (1.0, "float")),
              ("add_many", [(-0.0, b"x"), ((1,), None), ((True,), 2)], True)])  # equal keys
@example(ops=[("add_many", [("a", 1), ("b", [2, {"x": _lambda()}]), ("c", 3)], False),
              ("submit", ("big", b"\x5a" * 200_000)), ("add", (["unhashable"], 1))])
def test_items_of_any_type_are_refused_clearly_or_delivered(reused, variant, ops):
    reused(**variant).run(_check_ops, ops)


# -- values that change or sit at the limit of pickle ----------------------------------------

def _check_changed(holder, b, before_items, key, bad, after_items):
    was = b.stats()
    futures = [(b.submit(k, v), (k, v)) for k, v in before_items]
    box = [0]
    changed = b.submit(key, box)
    box.append(bad)  # after add(): the spec's "cannot be pickled" can no longer be raised here
    futures += [(b.submit(k, v), (k, v)) for k, v in after_items]
    holder.flush(b)
    for fut, item in futures:
        assert _same(fut.result(timeout=0), item[1]), item
    error = changed.exception(timeout=0)
    if error is not None:
        assert isinstance(error, mpbatch.SerializationError) and repr(key)[:80] in str(error)
    now = b.stats()
    assert now.accepted - was.accepted == len(futures) + 1
    assert now.pending == 0 and now.accepted == now.succeeded + now.dead_lettered, now


def _round_trips(key):
    """Equal to itself after pickling (not nan): keeps this test off the nan-key path."""
    return pickle.loads(pickle.dumps(key)) == key


GOOD_ITEMS = st.lists(st.tuples(GOOD_KEYS, GOOD_VALUES.filter(lambda v: len(repr(v)) < 500)),
                      max_size=3)


@pytest.mark.timeout(SHRINK_TIMEOUT)
@settings(max_examples=15, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(before_items=GOOD_ITEMS, key=GOOD_KEYS.filter(_round_trips), bad=st.builds(threading.Lock),
       after_items=GOOD_ITEMS)
def test_a_value_changed_after_add_is_not_lost(reused, before_items, key, bad, after_items):
    # interval=30: the open chunk waits for flush(), so the change lands before it is sent.
    reused(interval=30.0).run(_check_changed, before_items, key, bad, after_items)


def _nested(depth):
    """[[[...[0]...]]], ``depth`` lists deep."""
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def _first_unpicklable_depth():
    """The least depth at which pickle.dumps() of _nested() fails, called from here."""
    low, high = 1, 10_000
    while low < high:
        mid = (low + high) // 2
        try:
            pickle.dumps(_nested(mid), pickle.HIGHEST_PROTOCOL)
            low = mid + 1
        except RecursionError:
            high = mid
    return low


def _check_deep(holder, b, depth):
    was = b.stats()
    fut, exc = _call(b.submit, "deep", _nested(depth))
    if exc is not None:
        assert isinstance(exc, mpbatch.SerializationError) and "'deep'" in str(exc), exc
        return "refused"
    b.flush()  # from this thread: where the chunk is pickled decides how deep pickle can go
    assert fut.done()
    error = fut.exception(timeout=0)
    assert error is None or isinstance(error, mpbatch.MpbatchError), error
    now = b.stats()
    assert now.accepted - was.accepted == 1
    assert now.pending == 0 and now.accepted == now.succeeded + now.dead_lettered, now
    assert not holder.errors.texts, f"the collector logged\n{holder.errors.texts[0]}"
    return "dead-lettered" if error else "succeeded"


def test_nested_values_at_the_pickle_depth_limit_are_refused_or_delivered(reused):
    """Every depth around the limit (it moves with the stack): refused at submit(), or
    accepted and then succeeded or dead-lettered with a reason; flush() never raises."""
    holder = reused()
    limit = _first_unpicklable_depth()
    outcomes = {}
    for depth in range(limit - 16, limit + 4):
        try:
            outcomes[depth] = holder.run(_check_deep, depth)
        except BaseException as exc:
            exc.add_note(f"value nested {depth} deep; pickle.dumps() here fails from {limit}; "
                         f"the depths before: {outcomes}")
            raise
    assert "succeeded" in outcomes.values() and "refused" in outcomes.values(), outcomes
