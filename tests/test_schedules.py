import pytest

from teachers.schedules import Schedule, ScheduleLike, schedule_value


def test_constant():
    schedule = Schedule.parse(7.5)
    assert schedule.is_constant
    assert [schedule(s) for s in (0, 10, 10**6)] == [7.5, 7.5, 7.5]
    assert Schedule.parse(3)(5) == 3.0


def test_four_value_ramp_is_linear_and_clamped():
    schedule = Schedule.parse([100, 20.0, 10.0, 20100])
    assert schedule(0) == 20.0 and schedule(100) == 20.0
    assert schedule(10100) == pytest.approx(15.0)
    assert schedule(5100) == pytest.approx(17.5)
    assert schedule(20100) == 10.0 and schedule(10**6) == 10.0


def test_three_value_ramp_starts_at_step_zero():
    schedule = Schedule.parse([0.5, 0.02, 20000])
    assert schedule == Schedule(0, 0.5, 0.02, 20000)
    assert schedule(10000) == pytest.approx(0.26)


def test_same_start_and_end_step_is_a_step_function():
    schedule = Schedule.parse([50, 1.0, 0.0, 50])
    assert schedule(49) == 1.0 and schedule(50) == 0.0


def test_parse_accepts_tuples_floats_and_schedules():
    assert Schedule.parse((0, 1.0, 0.0, 10.0))(5) == pytest.approx(0.5)
    schedule = Schedule(0, 1.0, 2.0, 4)
    assert Schedule.parse(schedule) is schedule
    assert schedule_value([0, 0.0, 4.0, 4], 1) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad",
    [[1.0, 2.0], [0, 1, 2, 3, 4], "7.5", None, True, [0, 1.0, 0.0, 10.5], [10, 1.0, 0.0, 5]],
)
def test_bad_values_raise_one_line_value_error(bad):
    with pytest.raises(ValueError) as info:
        Schedule.parse(bad)
    assert "\n" not in str(info.value)


def test_yaml_forms_through_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cfg", type=ScheduleLike, default=7.5)
    parser.add_argument("--t_min", type=ScheduleLike, default=0.02)
    cfg = parser.parse_string("cfg: [0, 20, 10, 20000]\nt_min: 0.3\n")
    assert Schedule.parse(cfg.cfg)(10000) == pytest.approx(15.0)
    assert Schedule.parse(cfg.t_min)(123) == pytest.approx(0.3)
    assert Schedule.parse(parser.get_defaults().cfg)(0) == 7.5
