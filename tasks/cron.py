"""The five-field cron syntax: ``minute hour day-of-month month day-of-week``.

Supported, as in Vixie cron (``man 5 crontab``):

* ``*``, a number, a range ``a-b``, a list ``a,b,c-d``, a step ``*/n``,
  ``a-b/n`` or ``a/n`` (from ``a`` to the field's maximum);
* month names ``jan``..``dec`` and day names ``sun``..``sat`` (any case),
  usable in ranges (``mon-fri``);
* day of week ``0``..``7``, both 0 and 7 meaning Sunday;
* when both day fields are restricted (neither starts with ``*``), a day
  matches if *either* matches (``0 0 1 * mon``: the 1st, and every Monday);
* the aliases ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``,
  ``@daily`` (``@midnight``) and ``@hourly``.

Times are minutes: seconds are ignored. Schedules are evaluated in UTC.
"""

from __future__ import annotations

import calendar
import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}

# (name, lowest, highest, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)

#: How far :meth:`CronSchedule.previous` and :meth:`CronSchedule.next` look before
#: deciding an expression never matches (``0 0 30 2 *``: February 30th): 41 years, the
#: longest gap between two February 29ths on one weekday (2072 to 2112, across 2100, which
#: has none), for a date whose day of week must match too (``0 0 29 2 */7``, both day fields
#: then matching); a date other than February 29th falls on one weekday at most 12 years apart,
#: and February 29th itself at most 8 (2096 to 2104).
_HORIZON = timedelta(days=366 * 41)


class CronError(ValueError):
    """A cron expression that cannot be parsed; the message names the field and the problem."""


def _value(token: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    lowered = token.lower()
    if lowered in names:
        return names[lowered]
    if not (token.isascii() and token.isdigit()):
        raise CronError(f"{field}: {token!r} is not a number" + (" or a name" if names else ""))
    value = int(token)
    if not low <= value <= high:
        raise CronError(f"{field}: {value} is out of range {low}-{high}")
    return value


def _parse_field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
                raise CronError(f"{field}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            if not first or not last:
                raise CronError(f"{field}: range {base!r} needs a value on each side of '-'")
            start = _value(first, field, low, high, names)
            end = _value(last, field, low, high, names)
            if start > end:
                raise CronError(f"{field}: range {base!r} runs backwards")
        else:
            start = _value(base, field, low, high, names)
            end = high if slash else start  # "5/15" means 5, 20, 35, 50
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression: which minutes it fires at (UTC)."""

    #: As written (normalised spaces); two expressions of the same times are equal (``@hourly``, ``0 * * * *``).
    expression: str = field(compare=False)
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    #: True when the day-of-month / day-of-week field is restricted (does not start with ``*``).
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse ``expression``; raises :class:`CronError` naming the bad field, or saying that no
        date matches it (``0 0 30 2 *``, February 30th: cron would accept it and never run it)."""
        text = " ".join(expression.split())
        fields = ALIASES.get(text.lower(), text).split(" ")
        if len(fields) != 5:
            raise CronError(
                f"{expression!r}: a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                f"not {len(fields)}"
            )
        parsed = [
            _parse_field(raw, name, low, high, names)
            for raw, (name, low, high, names) in zip(fields, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in parsed[4])  # 7 is Sunday too
        schedule = cls(
            expression=text,
            minutes=parsed[0],
            hours=parsed[1],
            days=parsed[2],
            months=parsed[3],
            weekdays=weekdays,
            days_restricted=not fields[2].startswith("*"),
            weekdays_restricted=not fields[4].startswith("*"),
        )
        # Every day-of-month, month and day-of-week combination recurs within the horizon from 2000.
        if schedule.next(datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise CronError(f"{expression!r} never fires: no date has that day of month in that month"
                            + (" on that day of week" if len(schedule.weekdays) < 7 else ""))
        return schedule

    def _day_matches(self, when: datetime) -> bool:
        if when.month not in self.months:
            return False
        by_day = when.day in self.days
        by_weekday = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_day or by_weekday
        return by_day and by_weekday

    def matches(self, when: datetime) -> bool:
        """True when the schedule fires in the minute of ``when`` (a naive time is taken as UTC)."""
        when = as_utc(when)
        return when.minute in self.minutes and when.hour in self.hours and self._day_matches(when)

    def previous(self, when: datetime) -> datetime | None:
        """The latest firing time at or before ``when`` (to the minute), or None if there is none."""
        t = as_utc(when).replace(second=0, microsecond=0)
        limit = t - _HORIZON
        while t > limit:
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) - timedelta(minutes=1)  # end of the previous day
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) - timedelta(minutes=1)  # end of the previous hour
                continue
            if t.minute in self.minutes:
                return t
            t -= timedelta(minutes=1)
        return None

    def next(self, when: datetime) -> datetime | None:
        """The first firing time strictly after ``when``, or None if there is none."""
        t = as_utc(when).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + _HORIZON
        while t < limit:
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute in self.minutes:
                return t
            t += timedelta(minutes=1)
        return None

    def __str__(self) -> str:
        return self.expression


def as_utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken as UTC already."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@functools.lru_cache(maxsize=256)
def parse(expression: str) -> CronSchedule:
    """Parse a five-field cron expression (or an ``@alias``); raises :class:`CronError`.

    Cached: the settings parse their schedules at every ``Settings.from_env()``, and
    proving that an expression fires at all (``0 0 31 12 *`` looks up to a year ahead)
    is worth doing once per expression.
    """
    return CronSchedule.parse(expression)


__all__ = ["ALIASES", "CronError", "CronSchedule", "as_utc", "parse"]
