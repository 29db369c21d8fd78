"""Peers' words reach the terminal plain: no escape sequence from a member, a host or a dataset."""

from __future__ import annotations

import io

from crowdd.cli.commands import format_status
from crowdd.protocol.session import End, MemberView, check_host_frame
from crowdd.text import PlainWriter, plain

ESC = "\x1b[2J\x1b]0;pwned\x07"  # clear the screen, set the terminal's title


def test_plain_drops_control_characters_and_keeps_the_words() -> None:
    assert plain(f"w2{ESC}\r\bok") == "w2[2J]0;pwnedok"
    assert plain("émile 名前 [/x]") == "émile 名前 [/x]"  # printable text is kept as is (the TUI shows it as text)
    assert plain("abcdef", 3) == "abc"


def test_the_cli_prints_a_peers_words_without_escape_sequences() -> None:
    out = io.StringIO()
    w = PlainWriter(out)
    w.write(f"worker 2 ({ESC}) expelled\nnext line\n")
    assert out.getvalue() == "worker 2 ([2J]0;pwned) expelled\nnext line\n"
    st = {"version": "0.1", "state": "training", "role": "worker", "donating": True,
          "group": {"id": "0123456789abcdef", "index": 1, "members": [
              {"index": 0, "name": f"host{ESC}", "role": "host", "state": "training", "address": "a",
               "replication": {"done": 1, "total": 1}}]},
          "error": f"the host ended the session early: {ESC}"}
    out = io.StringIO()
    format_status(st, out)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "host[2J" in text, text


def test_a_hosts_words_arrive_plain() -> None:
    end = check_host_frame(End(error=f"bye{ESC}", model_path=f"/m{ESC}").to_frame())
    assert isinstance(end, End) and end.error == "bye[2J]0;pwned" and "\x1b" not in (end.model_path or "")
    m = MemberView.from_dict({"index": 1, "name": f"w{ESC}", "address": "a", "role": "worker", "state": "training",
                              "replication": {"done": 0, "total": 0}}, "members[0]")
    assert m.name == "w[2J]0;pwned"
