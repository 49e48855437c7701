"""Values a request sends, in the matchbox example's Go templates (examples/matchbox): a query
value is decoded text of the requester's choosing, so `generic/node.env.tmpl` quotes it with
`printf "%q"` and it stays on its own KEY=value line; `.request.raw_query` is still
percent-encoded, and the HTTP server refuses a raw control character in a query, so it carries
no line break into `ignition/flatcar.yaml` either. Through the real app and the real server."""

from __future__ import annotations

import base64
import json
import socket
import urllib.parse

import pytest

NODE1 = "52-54-00-89-d8-10"  # examples/matchbox/groups/node1.json selects it
NODE1_MAC = "52:54:00:89:d8:10"


def env_lines(text: str) -> dict[str, str]:
    """Every line of a KEY=value body (a `#` line aside) as a dict. str.splitlines splits at
    every line break Unicode knows (\\r, \\x85, \\u2028, ...), not only at \\n."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key not in out, f"an extra line: {line!r} in {text!r}"
        out[key] = value
    return out


@pytest.mark.parametrize("hostile", ["a\nEVIL=1", "a\r\nEVIL=1", "a\x85EVIL=1", "a\u2028EVIL=1",
                                     'a"\nEVIL="1', "a\\\nEVIL=1"],
                         ids=["lf", "crlf", "nel", "line-separator", "quotes", "backslash"])  # fmt: skip
def test_a_query_value_with_a_line_break_stays_on_its_env_line(hostile, matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    query = urllib.parse.urlencode({"mac": NODE1, "foo": hostile})
    r = c.get(f"/generic?{query}")
    assert r.status_code == 200, r.text
    env = env_lines(r.text)
    assert list(env) == ["MAC", "ETCD_NAME", "FOO", "RAW"]
    assert env["MAC"] == NODE1_MAC and env["ETCD_NAME"] == "node1"
    # one double-quoted line that reads back as the value the client sent
    assert json.loads(env["FOO"]) == hostile
    assert json.loads(env["RAW"]) == query


def test_a_value_not_sent_is_unset(matchbox_dir, client_for):
    r = client_for(matchbox_dir).get(f"/generic?mac={NODE1}")
    assert env_lines(r.text) == {"MAC": NODE1_MAC, "ETCD_NAME": "node1", "FOO": "unset",
                                 "RAW": f'"mac={NODE1}"'}  # fmt: skip


def node_info(config: dict) -> str:
    (source,) = [f["contents"]["source"] for f in config["storage"]["files"] if f["path"] == "/etc/node-info"]
    head, _, data = source.partition(",")
    return base64.b64decode(data).decode() if head.endswith(";base64") else urllib.parse.unquote(data)


def test_the_raw_query_reaches_the_template_still_encoded(matchbox_dir, client_for):
    # ignition/flatcar.yaml writes {{.request.raw_query}} into a `|` block: the encoded %0A is
    # three characters, not a line that would end the block
    query = f"mac={NODE1}&foo=a%0A%20%20%20%20-%20path:%20/etc/evil&bar=b%0D%0AEVIL=1"
    r = client_for(matchbox_dir).get(f"/ignition?{query}")
    assert r.status_code == 200, r.text
    config = r.json()
    assert [f["path"] for f in config["storage"]["files"]] == ["/etc/hostname", "/etc/node-info"]
    assert node_info(config) == f"etcd_name=node1\nmac={NODE1_MAC}\nquery={query}\n"


# a line feed, vertical tab, a control, NEL and U+2028 (YAML 1.1 line breaks), a tab, as raw bytes
RAW_VALUES = [b"a\nb", b"a\x0bb", b"a\x01b", b"a\x85b", b"a\xe2\x80\xa8b", b"a\tb"]


def test_the_server_refuses_a_raw_control_character_in_a_query(matchbox_dir, serve):
    # what makes .request.raw_query safe: it never holds what the client did not percent-encode
    server = serve(matchbox_dir)
    for raw in RAW_VALUES:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"GET /ignition?mac=" + NODE1.encode() + b"&foo=" + raw
                      + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")  # fmt: skip
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), (raw, answer[:200])
        # and the same query, encoded, is answered
        encoded = urllib.parse.quote_from_bytes(raw)
        assert server.get(f"/ignition?mac={NODE1}&foo={encoded}").status_code == 200, raw
