from __future__ import annotations

import asyncio
from collections import defaultdict

from gatewayd.model import DataType, DeviceState, DeviceStatus, Frame
from gatewayd.pipeline import GATHER_S
from tests.helpers import START_WALL, SimulatedRoom


def test_every_athlete_gets_one_heart_rate_sample_per_second_with_the_right_ts():
    room = SimulatedRoom(athletes=6)
    room.run_for(20)
    per_athlete = defaultdict(list)
    for sample in room.samples():
        if sample.t is DataType.HEART_RATE:
            per_athlete[sample.uid].append(sample.ts)
    assert sorted(per_athlete) == [f"sim-0{i}" for i in range(1, 7)]
    for uid, stamps in per_athlete.items():
        assert stamps == sorted(set(stamps)), f"{uid}: a second twice or out of order"
        assert all(ts == int(ts) for ts in stamps)
        # from the first full second to the last closed one, no second is missing
        assert stamps == [stamps[0] + i for i in range(len(stamps))], uid
        assert stamps[0] <= START_WALL + 2 and stamps[-1] >= START_WALL + 18


def test_bad_frames_are_counted_per_device_and_profile_and_the_rest_flows():
    room = SimulatedRoom(athletes=2)
    room.run_for(2)
    for _ in range(5):
        room.frames.put(
            Frame(
                "ant", "sim", "120:77", "ant:120", b"\x00\x01", room.clock.mono(), room.clock.wall()
            )
        )
    room.run_for(3)
    assert room.pipeline.decode_errors[("ant/120:77", "ant-hr")] == 5
    assert any(s.t is DataType.HEART_RATE and s.ts >= START_WALL + 3 for s in room.samples())


def test_a_dropped_athlete_is_reported_lost_and_stops_producing():
    room = SimulatedRoom(athletes=2, drop_after_s={"sim-02": 5.0})
    room.run_for(15)
    events = room.events.get_nowait()
    lost = [e for e in events if isinstance(e, DeviceStatus) and e.state is DeviceState.LOST]
    assert {e.uid for e in lost} == {"sim-02"}
    last = max(e.ts for e in events if not isinstance(e, DeviceStatus) and e.uid == "sim-02")
    assert last < START_WALL + 5 + room.pipeline.config.lost_after_s
    assert any(
        not isinstance(e, DeviceStatus) and e.uid == "sim-01" and e.ts > START_WALL + 12
        for e in events
    )


def test_unknown_devices_are_ignored_when_the_roster_says_so():
    room = SimulatedRoom(athletes=1)
    room.pipeline.roster.track_unknown = False
    room.frames.put(
        Frame(
            "ble",
            "hci0",
            "AA:BB:CC:DD:EE:FF",
            "2a37",
            b"\x00\x50",
            room.clock.mono(),
            room.clock.wall(),
        )
    )
    room.run_for(1)
    assert room.pipeline.ignored_frames == 1


async def test_a_sources_batch_is_taken_at_once_and_a_lone_frame_waits_for_company():
    # A lone frame makes the pipeline wait GATHER_S for its neighbours; a batch a source gathered
    # itself (ANT+: a USB transfer's worth) is taken on the next turn of the loop.
    room = SimulatedRoom(athletes=1)
    task = asyncio.create_task(room.pipeline.run())

    def frame(n: int) -> Frame:
        page = bytes([4, 0, 0, 0, 0, 0, n, 60])
        return Frame("ant", "ant0", "120:7", "ant:120", page, room.clock.mono(), room.clock.wall())

    async def turns(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    try:
        await turns(5)
        room.frames.put_batch([frame(1), frame(2)])
        assert room.frames.gathered
        await turns(5)
        assert len(room.frames) == 0 and room.pipeline.ignored_frames + room.pipeline.processed == 2
        room.frames.put(frame(3))
        assert not room.frames.gathered
        await turns(5)  # far less than GATHER_S: the frame is still waiting
        assert len(room.frames) == 1
        room.frames.put_batch([frame(4)])  # joins a frame that waits: still waits
        assert not room.frames.gathered
        await asyncio.sleep(GATHER_S * 3)
        assert len(room.frames) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
