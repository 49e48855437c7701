"""bastion.render.gotemplate: the Go text/template subset matchbox templates use."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.render.gotemplate import TemplateError, go_float, parse

DATA = {
    "hostname": "node1.example.com",
    "count": 3.0,
    "ratio": 1.5,
    "gate": True,
    "keys": ["k1", "k2"],
    "nested": {"rack": "a", "slot": 4.0},
    "empty": "",
    "empty_list": [],
    "request": {"query": {"mac": "52:54:00:a1:9c:ae", "foo": "bar"}, "raw_query": "mac=52-54-00-a1-9c-ae&foo=bar"},
}


def render(text, data=DATA):
    return parse(text).render(data)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{{.hostname}}", "node1.example.com"),
        ("{{ .nested.rack }}-{{.nested.slot}}", "a-4"),
        ("{{.count}} {{.ratio}} {{.gate}}", "3 1.5 true"),
        ("{{.request.query.mac}}", "52:54:00:a1:9c:ae"),
        ("{{.request.raw_query}}", "mac=52-54-00-a1-9c-ae&foo=bar"),
        ("{{.keys}}", "[k1 k2]"),
        ("{{.nested}}", "map[rack:a slot:4]"),
        ("{{if .gate}}yes{{else}}no{{end}}", "yes"),
        ("{{if .empty}}yes{{else if .keys}}keys{{else}}no{{end}}", "keys"),
        ("{{if index . \"missing\"}}yes{{else}}no{{end}}", "no"),
        ("{{if not .empty}}empty{{end}}", "empty"),
        ("{{range $k := .keys}}[{{$k}}]{{end}}", "[k1][k2]"),
        ("{{range $i, $k := .keys}}{{$i}}={{$k}};{{end}}", "0=k1;1=k2;"),
        ("{{range .keys}}<{{.}}>{{end}}", "<k1><k2>"),
        ("{{range $k, $v := .nested}}{{$k}}:{{$v}} {{end}}", "rack:a slot:4 "),
        ("{{range .empty_list}}x{{else}}none{{end}}", "none"),
        ("{{with .nested}}{{.rack}}{{end}}", "a"),
        ("{{with .empty}}x{{else}}no{{end}}", "no"),
        ("{{$h := .hostname}}{{$h}}", "node1.example.com"),
        ("{{index .keys 1}} {{index .nested \"rack\"}}", "k2 a"),
        ("{{len .keys}}", "2"),
        ("{{printf \"%s:%d\" .hostname 7}}", "node1.example.com:7"),
        ("{{.hostname | printf \"%q\"}}", '"node1.example.com"'),
        ("{{eq .nested.rack \"a\"}} {{ne .nested.rack \"a\"}} {{eq .nested.rack \"b\" \"a\"}}", "true false true"),
        ("{{if and .gate .keys}}both{{end}}", "both"),
        ("{{or .empty \"fallback\"}}", "fallback"),
        ("{{lt 1 2}} {{ge .count 3}}", "true true"),
        ("{{print \"a\" 1 2 \"b\"}}", "a1 2b"),
        ("{{urlquery .request.raw_query}}", "mac%3D52-54-00-a1-9c-ae%26foo%3Dbar"),
        ("a  {{- .hostname -}}  \n b", "anode1.example.comb"),
        ("x{{/* a comment */}}y", "xy"),
        ("x {{- /* trimmed comment */ -}} y", "xy"),
        ("{{`raw {{ string`}}", "raw {{ string"),
        ("{{(index .keys 0)}}", "k1"),
        ("{{ -3 }}", "-3"),
    ],
)
def test_render(text, expected):
    assert render(text) == expected


def test_html_and_js_escape_as_go_does_to_the_byte():
    # Go's HTMLEscapeString and JSEscapeString (text/template's html and js): the js of a value
    # from a LAN host's query could close a script element here (< > & = were left as they
    # were) where it could not under matchbox
    from bastion.render import gotemplate

    value = "</script>\u00e9'\"&=\\\x01\x00\u2028"
    out = gotemplate.parse("{{ js .x }}|{{ html .x }}").render({"x": value})
    assert out == ("\\u003C/script\\u003E\u00e9\\'\\\"\\u0026\\u003D\\\\\\u0001\\u0000\\u2028|"
                   "&lt;/script&gt;\u00e9&#39;&#34;&amp;=\\\x01\ufffd\u2028")  # fmt: skip


def test_missing_key_is_an_error_with_its_line_like_missingkey_error():
    with pytest.raises(TemplateError) as e:
        render("ok\n{{.hostname}}\n{{.nope}}\n")
    assert e.value.line == 3
    assert 'no entry for key "nope"' in str(e.value)


def test_nested_missing_key_and_nil_are_errors():
    with pytest.raises(TemplateError):
        render("{{.nested.nope}}")
    with pytest.raises(TemplateError):
        parse("{{.a.b}}").render({"a": None})


@pytest.mark.parametrize(
    "text, line",
    [
        ("{{if .x}}", 1),
        ("a\n{{end}}", 2),
        ("a\nb\n{{ .x ", 3),
        ("{{ nosuchfunc .x }}", 1),
        ("{{ template \"other\" }}", 1),
        ("{{define \"x\"}}{{end}}", 1),
        ('{{ "unterminated }}', 1),
        ("{{ .x | }}", 1),
        ("{{}}", 1),
        ("{{range .x}}{{else}}{{else}}{{end}}", 1),
        ("{{ .a ) }}", 1),
        ("x\n\n{{/* unterminated comment }}", 3),
    ],
)
def test_parse_errors_name_the_line(text, line):
    with pytest.raises(TemplateError) as e:
        parse(text)
    assert e.value.line == line


def test_giving_arguments_to_a_value_is_an_error():
    with pytest.raises(TemplateError, match="non-function"):
        render("{{.hostname .count}}")


def test_go_float_prints_like_go():
    # fmt's %v is strconv's shortest %g: exponent form below 1e-4 and from 1e6 on (1e20 printed
    # in full is encoding/json's rule, not fmt's).
    assert [go_float(x) for x in (3.0, 1.5, 1e21, 1e20, -2.0, 0.1)] == ["3", "1.5", "1e+21", "1e+20", "-2", "0.1"]
    cases = {999999.0: "999999", 1e6: "1e+06", 1234567.0: "1.234567e+06", 123456.7: "123456.7",
             0.0001: "0.0001", 0.00001: "1e-05", 1.5e-7: "1.5e-07", 1e100: "1e+100", -0.0: "-0",
             608863452348.1149: "6.088634523481149e+11", 0.30000000000000004: "0.30000000000000004"}  # fmt: skip
    assert {x: go_float(x) for x in cases} == cases


@given(st.text(alphabet=st.sampled_from(list("{}.$-|() \"`/*abcifrangeendx\n")), max_size=40))
def test_parse_and_render_only_raise_template_error(text):
    try:
        t = parse(text)
        t.render({"a": 1, "x": [1, 2], "b": {"c": "d"}})
    except TemplateError:
        pass
