"""Skin loading, errors with file:line, hot reload keeping the last good version, sandbox."""

from __future__ import annotations

import os
import shutil

import pytest

from relay.transform import Decisions, SkinError, SkinLibrary

from .conftest import SKINS, html_part, load, parse, run


@pytest.fixture
def skin_dir(tmp_path):
    root = tmp_path / "skins"
    shutil.copytree(SKINS / "plain", root / "shop")
    return root


def _touch_later(path, text):
    path.write_text(text, "utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_load_names_version(skin_dir):
    lib = SkinLibrary.load(skin_dir)
    assert lib.names() == ["shop"]
    v = lib.version("shop")
    assert len(v) == 12 and v == SkinLibrary.load(skin_dir).version("shop")
    assert lib.get("shop").brand["name"] == "Maison Test"


@pytest.mark.parametrize(
    "file, text, line",
    [
        ("layout.html", "<p>ok</p>\n<p>{{ content }</p>\n", 2),
        ("layout.html", "<p>\n\n{% for x in %}</p>", 3),
        ("skin.toml", '[brand]\nname = "x"\ncolours = [\n', 4),
        ("layout.txt", "ok\n{% if %}\n", 2),
        ("layout.html", "<p>{{ content }}</p>\n{{ brand.name|nosuchfilter }}\n", 2),
    ],
)
def test_broken_skin_reports_file_and_line(skin_dir, file, text, line):
    (skin_dir / "shop" / file).write_text(text, "utf-8")
    with pytest.raises(SkinError) as exc:
        SkinLibrary.load(skin_dir)
    assert exc.value.file.endswith(file)
    assert exc.value.line == line
    assert f"{file}:{line}:" in str(exc.value)


def test_runtime_error_in_template_reported(skin_dir):
    (skin_dir / "shop" / "layout.html").write_text("<p>{{ content }}</p>\n\n{{ 1 / 0 }}\n", "utf-8")
    with pytest.raises(SkinError) as exc:
        SkinLibrary.load(skin_dir)
    assert exc.value.file.endswith("layout.html") and exc.value.line == 3


def test_reload_keeps_last_good(skin_dir, caplog):
    lib = SkinLibrary.load(skin_dir)
    layout = skin_dir / "shop" / "layout.html"
    good = lib.version("shop")
    assert lib.reload_if_changed() is False  # nothing changed
    _touch_later(layout, "<p>{{ content }}\n{% endif %}</p>")
    assert lib.reload_if_changed() is False
    assert lib.version("shop") == good and "shop" in lib.errors
    assert "layout.html:2" in caplog.text
    assert lib.reload_if_changed() is False  # reported once, still the good one
    out, report = run(load("latin1_text_qp.eml"), lib, skin="shop")
    assert report.action == "rewrapped" and report.skin_version == good
    _touch_later(layout, '<div class="v2">{{ brand.name }} {{ content }}</div>')
    assert lib.reload_if_changed() is True
    assert lib.version("shop") != good and not lib.errors
    out, report = run(load("latin1_text_qp.eml"), lib, skin="shop")
    assert report.skin_version == lib.version("shop")
    assert 'class="v2"' in html_part(parse(out))


def test_reload_adds_and_removes(skin_dir):
    lib = SkinLibrary.load(skin_dir)
    shutil.copytree(skin_dir / "shop", skin_dir / "second")
    assert lib.reload_if_changed() is True and lib.names() == ["second", "shop"]
    shutil.rmtree(skin_dir / "second")
    assert lib.reload_if_changed() is True and lib.names() == ["shop"]


def test_missing_dir_and_layout(tmp_path):
    with pytest.raises(SkinError):
        SkinLibrary.load(tmp_path / "nope")
    (tmp_path / "s" / "x").mkdir(parents=True)
    (tmp_path / "s" / "x" / "skin.toml").write_text("[brand]\n")
    with pytest.raises(SkinError, match="layout.html"):
        SkinLibrary.load(tmp_path / "s")


def test_sandbox_blocks_unsafe_template(skin_dir):
    (skin_dir / "shop" / "layout.html").write_text(
        "{{ content }}{{ ''.__class__.__mro__[1].__subclasses__() }}", "utf-8"
    )
    with pytest.raises(SkinError, match="SecurityError|unsafe"):
        SkinLibrary.load(skin_dir)


def test_autoescape_of_message_fields(skins):
    raw = load("latin1_text_qp.eml").replace(
        b"Subject: =?ISO-8859-1?Q?Votre_colis_est_pr=EAt?=", b"Subject: <b>{{ 7*7 }}</b> <script>x</script>"
    )
    out, _ = run(raw, skins, decisions=Decisions(skin="plain"))
    html = html_part(parse(out))
    assert "<title>&lt;b&gt;{{ 7*7 }}&lt;/b&gt; &lt;script&gt;x&lt;/script&gt;</title>" in html
