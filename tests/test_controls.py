"""UI controls: a program's buttons and sliders, used from a websocket client, call its
callbacks; both APIs, end to end, and the parsers on their own."""

from __future__ import annotations

import json

import pytest

from further_link.errors import ProcessMessageError, ProtocolError
from further_link.protocol.events import Control, Controls, Plot, UseControl
from further_link.protocol.run import encode_run_event, parse_run_command
from further_link.protocol.runpy import encode_event, parse_command

from conftest import Client
from v5client import V5Connect, connect_run

__all__ = ["connect_run"]

# Declares the brief's two controls, says so, then reacts until the slider reaches 42.
ROBOT = """\
import threading
import further_link

done = threading.Event()

def go():
    print("pressed", go_button.presses, flush=True)

def set_speed(value):
    print("speed", value, flush=True)
    if value == 42:
        done.set()

go_button = further_link.button("Go", on_press=go)
speed = further_link.slider("speed", 0, 100, on_change=set_speed)
print("ready", flush=True)
done.wait(60)
print("final speed", speed.value)
"""

DECLARED = [
    {"id": "go", "kind": "button", "label": "Go"},
    {
        "id": "speed",
        "kind": "slider",
        "label": "speed",
        "min": 0,
        "max": 100,
        "step": 1,
        "value": 0,
    },
]


async def test_button_and_slider_reach_the_program_on_run_py(client: Client) -> None:
    await client.send("start", {"sourceScript": ROBOT})
    assert (await client.receive())["type"] == "started"
    first = await client.receive()
    assert first == {"type": "controls", "data": {"controls": DECLARED[:1]}}
    # The whole set again when it changes, before the program's next print.
    assert await client.receive() == {"type": "controls", "data": {"controls": DECLARED}}
    await client.read_output("ready\n")
    await client.send("control", {"id": "go"})
    await client.read_output("pressed 1\n")
    await client.send("control", {"id": "go"})
    await client.read_output("pressed 2\n")
    await client.send("control", {"id": "speed", "value": 42})
    await client.read_output("speed 42\nfinal speed 42\n")
    result = await client.collect()
    assert result.exit_code == 0, result.stderr


async def test_button_and_slider_reach_the_program_on_v5(connect_run: V5Connect) -> None:
    client = await connect_run()
    await client.send("start", "robot", {"runner": "python3", "code": ROBOT})
    await client.expect("robot", "started")
    await client.expect("robot", "controls")
    declared = await client.expect("robot", "controls")
    assert declared["data"] == {"controls": DECLARED}
    await client.read_output("robot", "ready\n")
    await client.send("control", "robot", {"id": "go"})
    await client.read_output("robot", "pressed 1\n")
    await client.send("control", "robot", {"id": "speed", "value": 42})
    await client.read_output("robot", "speed 42\nfinal speed 42\n")
    assert (await client.collect("robot")).exit_code == 0


async def test_unknown_control_and_bad_values_are_errors_that_reach_no_callback(
    connect_run: V5Connect,
) -> None:
    client = await connect_run()
    await client.send("start", "robot", {"runner": "python3", "code": ROBOT})
    await client.expect("robot", "started")
    await client.expect("robot", "controls")
    await client.expect("robot", "controls")
    await client.read_output("robot", "ready\n")
    for data, said in (
        ({"id": "stop"}, "no control 'stop'"),
        ({"id": "speed", "value": 101}, "takes 0 to 100, not 101"),
        ({"id": "speed"}, "needs data.value"),
        ({"id": "go", "value": 3}, "is a button; send no value"),
    ):
        await client.send("control", "robot", data)
        error = await client.expect("robot", "error")
        assert said in error["data"]["message"], error
    await client.send("control", "robot", {"id": "speed", "value": 42})
    # No callback ran for a refused message: this is the program's next output.
    await client.read_output("robot", "speed 42\nfinal speed 42\n")
    assert (await client.collect("robot")).exit_code == 0


async def test_control_without_a_running_program_is_an_error(client: Client) -> None:
    await client.send("control", {"id": "go"})
    error = await client.receive()
    assert error["type"] == "error"
    assert "no program is running" in error["data"]["message"]


async def test_a_failing_callback_is_reported_and_the_controls_keep_working(
    client: Client,
) -> None:
    script = (
        "import threading, further_link\n"
        "done = threading.Event()\n"
        "def boom():\n"
        "    if b.presses == 1:\n"
        "        raise ValueError('first press fails')\n"
        "    print('second press', flush=True)\n"
        "    done.set()\n"
        "b = further_link.button('Boom', on_press=boom)\n"
        "print('ready', flush=True)\n"
        "done.wait(60)\n"
    )
    await client.send("start", {"sourceScript": script})
    await client.receive_type("controls")
    await client.read_output("ready\n")
    await client.send("control", {"id": "boom"})
    stderr = ""
    # The traceback's last line, not its source line (which also quotes the text):
    # the traceback may arrive in several messages.
    while "ValueError: first press fails\n" not in stderr:
        message = await client.receive()
        assert message["type"] == "stderr", message
        stderr += message["data"]["output"]
    assert "Traceback" in stderr
    await client.send("control", {"id": "boom"})
    await client.read_output("second press\n")
    assert (await client.collect()).exit_code == 0


async def test_a_malformed_declaration_never_reaches_the_client(client: Client) -> None:
    """A program writing its side channel itself cannot send the page a control it
    could not declare through the library (ids, labels and numbers are checked)."""
    script = (
        "import json\n"
        "from further_link.channel import KIND_CONTROL, ChannelError, _connection\n"
        "bad = [{'id': 'x', 'kind': 'script', 'label': 'x'},\n"
        "       {'id': '', 'kind': 'button', 'label': 'x'},\n"
        "       {'id': 'x', 'kind': 'button', 'label': 'x' * 5000},\n"
        "       {'id': 's', 'kind': 'slider', 'label': 's', 'min': 0, 'max': 1e400,\n"
        "        'step': 1, 'value': 0},\n"
        "       [1, 2]]\n"
        "for shape in bad:\n"
        "    try:\n"
        "        _connection.send(KIND_CONTROL, json.dumps(shape).encode())\n"
        "        print('accepted', shape)\n"
        "    except ChannelError:\n"
        "        print('refused')\n"
        "_connection.send(KIND_CONTROL, b'not json')\n"
    )
    result = await client.run({"sourceScript": script})
    assert result.stdout == "refused\n" * 5
    assert "ChannelError" in result.stderr  # the last one, uncaught
    assert {m["type"] for m in result.messages} <= {"stdout", "stderr", "stopped"}


async def test_many_controls_are_capped(client: Client) -> None:
    script = "import further_link\nfor i in range(40):\n    further_link.button(f'b{i}')\n"
    result = await client.run({"sourceScript": script})
    sets = [m["data"]["controls"] for m in result.messages if m["type"] == "controls"]
    assert len(sets[-1]) == 32
    assert "controls are not available" in result.stderr


# ------------------------------------------------------------- the wire formats


def test_control_messages_parse_on_both_apis() -> None:
    assert parse_command('{"type": "control", "data": {"id": "go"}}') == UseControl("go")
    assert parse_command(
        '{"type": "control", "data": {"id": "speed", "value": 42.5}}'
    ) == UseControl("speed", 42.5)
    assert parse_run_command(
        '{"type": "control", "process": "p", "data": {"id": "speed", "value": 7}}'
    ) == UseControl("speed", 7, process="p")


@pytest.mark.parametrize("value", ["42", True, [1], {"a": 1}])
def test_a_control_value_must_be_a_number(value: object) -> None:
    text = json.dumps({"type": "control", "data": {"id": "s", "value": value}})
    with pytest.raises(ProtocolError, match=r"data\.value must be a number"):
        parse_command(text)
    with pytest.raises(ProcessMessageError) as caught:
        parse_run_command(
            json.dumps({"type": "control", "process": "p", "data": {"id": "s", "value": value}})
        )
    assert caught.value.process == "p"


def test_infinite_and_missing_ids_are_refused() -> None:
    with pytest.raises(ProtocolError, match="must be a number"):
        parse_command('{"type": "control", "data": {"id": "s", "value": Infinity}}')
    with pytest.raises(ProtocolError, match=r"control needs data\.id"):
        parse_command('{"type": "control", "data": {}}')


def test_plot_and_controls_events_have_the_agreed_shapes() -> None:
    plot = Plot(1, "iVBOR", 640, 480)
    assert json.loads(encode_event(plot)) == {
        "type": "plot",
        "data": {"figure": 1, "png": "iVBOR", "width": 640, "height": 480},
    }
    v5 = json.loads(encode_run_event(Plot(2, "x", 1, 1, process="p"), "c"))
    assert v5 == {
        "type": "plot",
        "data": {"figure": 2, "png": "x", "width": 1, "height": 1},
        "client": "c",
        "process": "p",
    }
    controls = Controls(
        (Control("go", "button", "Go"), Control("speed", "slider", "speed", 0, 100, 1, 0))
    )
    assert json.loads(encode_event(controls)) == {
        "type": "controls",
        "data": {"controls": DECLARED},
    }
    assert json.loads(encode_event(Controls(()))) == {"type": "controls", "data": {"controls": []}}
