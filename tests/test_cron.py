"""The five-field cron parser: fields, ranges, steps, lists, names, day-of-week rules, previous/next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tasks.cron import CronError, CronSchedule, parse


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def firings(expression: str, start: str, end: str) -> list[str]:
    """Every firing time in [start, end], as 'YYYY-MM-DD HH:MM'."""
    cron = parse(expression)
    found, t = [], at(start) - timedelta(minutes=1)
    while True:
        nxt = cron.next(t)
        if nxt is None or nxt > at(end):
            return found
        found.append(nxt.strftime("%Y-%m-%d %H:%M"))
        t = nxt


def test_every_five_minutes() -> None:
    # Given */5 in the minute field
    # When it is evaluated over half an hour
    # Then it fires on the multiples of five
    assert firings("*/5 * * * *", "2026-03-02 10:00", "2026-03-02 10:30") == [
        f"2026-03-02 10:{m:02d}" for m in range(0, 31, 5)
    ]


def test_ranges_steps_and_lists_combine() -> None:
    # Given a list mixing a single value, a stepped range and a start/step
    cron = parse("7,10-20/5,50/4 * * * *")
    # Then it fires at exactly those minutes
    assert sorted(cron.minutes) == [7, 10, 15, 20, 50, 54, 58]
    # And hours, days, months, weekdays are unrestricted
    assert len(cron.hours) == 24 and len(cron.days) == 31 and len(cron.months) == 12 and len(cron.weekdays) == 7


def test_hour_range_with_step() -> None:
    # Given the first minute of every second hour from 8 to 16
    # Then it fires at 8, 10, 12, 14 and 16 o'clock only
    assert firings("0 8-16/2 * * *", "2026-03-02 00:00", "2026-03-02 23:59") == [
        f"2026-03-02 {h:02d}:00" for h in (8, 10, 12, 14, 16)
    ]


def test_day_of_week_names_and_numbers() -> None:
    # Given weekdays by name, and the same by number
    # 2026-03-02 is a Monday
    weekdays = firings("30 9 * * mon-fri", "2026-03-01 00:00", "2026-03-08 23:59")
    # Then Monday to Friday fire, the weekend does not
    assert weekdays == [f"2026-03-0{d} 09:30" for d in (2, 3, 4, 5, 6)]
    assert firings("30 9 * * 1-5", "2026-03-01 00:00", "2026-03-08 23:59") == weekdays


def test_sunday_is_both_0_and_7() -> None:
    # Given Sunday written as 0, as 7, and as a name
    # Then all three fire on Sunday 2026-03-01 and 2026-03-08 only
    for expression in ("0 12 * * 0", "0 12 * * 7", "0 12 * * SUN"):
        assert firings(expression, "2026-03-01 00:00", "2026-03-14 00:00") == [
            "2026-03-01 12:00",
            "2026-03-08 12:00",
        ], expression


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # Given the 1st of the month and every Friday (cron's OR rule)
    # When evaluated over March 2026 (Fridays: 6, 13, 20, 27)
    # Then both kinds of day fire
    assert firings("0 0 1 * fri", "2026-03-01 00:00", "2026-03-31 23:59") == [
        "2026-03-01 00:00",
        "2026-03-06 00:00",
        "2026-03-13 00:00",
        "2026-03-20 00:00",
        "2026-03-27 00:00",
    ]


def test_day_of_month_and_a_starred_day_of_week() -> None:
    # Given day-of-month 13 and a day-of-week starting with * (*/1): AND, not OR
    # Then only the 13th fires
    assert firings("0 0 13 * */1", "2026-03-01 00:00", "2026-04-30 23:59") == [
        "2026-03-13 00:00",
        "2026-04-13 00:00",
    ]


def test_month_names_and_aliases() -> None:
    # Given months by name, and the @ aliases
    assert firings("0 0 1 jan,jul *", "2026-01-01 00:00", "2026-12-31 23:59") == [
        "2026-01-01 00:00",
        "2026-07-01 00:00",
    ]
    # Then each alias means its five-field form
    assert parse("@daily").hours == frozenset({0}) and parse("@daily").minutes == frozenset({0})
    assert parse("@hourly").hours == frozenset(range(24))
    assert parse("@weekly").weekdays == frozenset({0})
    assert parse("@monthly").days == frozenset({1})
    assert parse("@yearly").months == frozenset({1}) == parse("@annually").months


def test_previous_is_the_latest_firing_at_or_before() -> None:
    cron = parse("0 3 * * *")
    # Given a time after the day's firing, exactly on it, and before it
    # Then previous() is today's 03:00, today's 03:00, and yesterday's 03:00
    assert cron.previous(at("2026-03-02 10:17:42")) == at("2026-03-02 03:00")
    assert cron.previous(at("2026-03-02 03:00:59")) == at("2026-03-02 03:00")
    assert cron.previous(at("2026-03-02 02:59:59")) == at("2026-03-01 03:00")


def test_next_crosses_month_and_year_ends() -> None:
    # Given the last minute of a year
    # Then the next firing of the 1st of each month at midnight is New Year
    assert parse("0 0 1 * *").next(at("2026-12-31 23:59")) == at("2027-01-01 00:00")
    # And February 29th is found in the next leap year
    assert parse("0 0 29 2 *").next(at("2026-03-01 00:00")) == at("2028-02-29 00:00")


def test_an_impossible_date_is_refused_as_never_firing() -> None:
    # Given February 30th, and April 31st: cron would accept them and never run them
    for expression in ("0 0 30 2 *", "0 0 31 4 *"):
        with pytest.raises(CronError, match="never fires"):
            parse(expression)
    # But a day that only some years have, or either day when both day fields are set, is fine
    assert parse("0 0 29 2 *").next(at("2026-01-01 00:00")) == at("2028-02-29 00:00")
    assert parse("0 0 30 2 mon").next(at("2026-01-01 00:00")) == at("2026-02-02 00:00")  # a Monday in February


def test_the_same_times_written_two_ways_are_the_same_schedule() -> None:
    assert parse("@hourly") == parse("0 * * * *")
    assert parse("@hourly") != parse("5 * * * *")


def test_february_29th_is_found_across_the_eight_years_without_one() -> None:
    # Given a schedule on February 29th, looked for after the 2096 one (2100 is not a leap year)
    cron = parse("0 0 29 2 *")
    # Then the next is in 2104, and the previous from 2104 is 2096's
    assert cron.next(at("2096-03-01 00:00")) == at("2104-02-29 00:00")
    assert cron.previous(at("2104-02-28 00:00")) == at("2096-02-29 00:00")


def test_matches_ignores_seconds_and_reads_naive_times_as_utc() -> None:
    # Given a schedule at 10:15 UTC
    cron = parse("15 10 * * *")
    # Then any second of 10:15 matches, 10:16 does not
    assert cron.matches(datetime(2026, 3, 2, 10, 15, 59))
    assert not cron.matches(datetime(2026, 3, 2, 10, 16))
    # And an aware time elsewhere is converted: 11:15 in UTC+1 is 10:15 UTC
    assert cron.matches(datetime(2026, 3, 2, 11, 15, tzinfo=timezone(timedelta(hours=1))))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "5 fields"),
        ("60 * * * *", "minute: 60 is out of range 0-59"),
        ("* 24 * * *", "hour: 24 is out of range 0-23"),
        ("* * 0 * *", "day of month: 0 is out of range 1-31"),
        ("* * * 13 *", "month: 13 is out of range 1-12"),
        ("* * * * 8", "day of week: 8 is out of range 0-7"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("10-5 * * * *", "runs backwards"),
        ("* * * foo *", "month: 'foo' is not a number or a name"),
        ("1,,2 * * * *", "empty list item"),
        ("\u00b2 * * * *", "minute: '\u00b2' is not a number"),  # a superscript two: a digit to str.isdigit
        ("* * * * */\u00b2", "step '\u00b2' must be a positive number"),
        ("-1 * * * *", "minute: range '-1' needs a value on each side"),
        ("1- * * * *", "minute: range '1-' needs a value on each side"),
    ],
)
def test_bad_expressions_name_the_field(expression: str, message: str) -> None:
    # Given a malformed expression
    # When it is parsed
    # Then a CronError says which field is wrong and why
    with pytest.raises(CronError, match=message.replace("(", r"\(")):
        CronSchedule.parse(expression)

def test_a_date_and_weekday_that_meet_only_every_few_years_are_not_refused_as_never_firing() -> None:
    # Given October 18th when it is a Sunday (a stepped day of week starts with '*': both day fields
    # must match, as in Vixie cron): a Sunday in 2015, 2020, 2026, but in no year from 2000 to 2008
    cron = "0 0 18 10 */7"
    # When it is declared, Then it is taken, and fires on 2026-10-18, a Sunday
    assert CronSchedule.parse(cron).next(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(2026, 10, 18, tzinfo=UTC)
    # And February 1st or 22nd when it is a Wednesday (2023, then 2034): its next tick is found,
    # not "none" (`controlplane clock --list` showed no next tick)
    rare = CronSchedule.parse("8 16 */21 2 3")
    assert rare.next(datetime(2026, 1, 3, tzinfo=UTC)) == datetime(2034, 2, 1, 16, 8, tzinfo=UTC)
    assert rare.previous(datetime(2034, 1, 1, tzinfo=UTC)) == datetime(2023, 2, 22, 16, 8, tzinfo=UTC)
