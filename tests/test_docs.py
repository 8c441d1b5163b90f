"""The README, RESULTS.md and docs/ cannot rot silently: their links lead somewhere, the files
and scripts they name exist, and each `--name=value` they show a driver is one of its settings."""
import glob
import os
import re

import pytest

from conftest import ROOT, driver_settings

PAGES = sorted(['README.md', 'RESULTS.md'] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))])
LINK = re.compile(r'\]\(([^)\s]+)\)')
NAMED_FILE = re.compile(r'`((?:\.\./)?[\w.-]+(?:/[\w.-]+)*\.(?:py|sh|md|txt|example|png|jsonl))`')
DRIVERS = ('cifar10_convnet.py', 'mnist_mlp.py')


def text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def test_the_pages_are_all_there():
    assert {'README.md', 'RESULTS.md', 'docs/history.md', 'docs/gpu.md'} <= set(PAGES)


@pytest.mark.parametrize('page', PAGES)
def test_every_link_leads_to_a_file_of_the_project(page):
    folder = os.path.dirname(os.path.join(ROOT, page))
    targets = [t.split('#')[0] for t in LINK.findall(text(page)) if not re.match(r'[a-z]+:|#', t)]
    missing = [t for t in targets if not os.path.exists(os.path.join(folder, t))]
    assert missing == []


@pytest.mark.parametrize('page', [p for p in PAGES if p != 'docs/history.md'])
def test_every_file_named_in_backquotes_exists(page):
    """Named from the project's top folder, as the commands are given (or from the page's own).
    The history names files as they were then."""
    folder = os.path.dirname(os.path.join(ROOT, page))
    missing = [name for name in set(NAMED_FILE.findall(text(page)))
               if not any(os.path.exists(os.path.join(base, name)) for base in (ROOT, folder))]
    assert sorted(missing) == []


@pytest.mark.parametrize('driver', DRIVERS)
def test_every_setting_shown_to_a_driver_is_one_of_its_settings(driver):
    settings = set(driver_settings([driver])) | {'help', 'name'}     # `--name=value` itself
    shown = {name for page in PAGES for line in text(page).splitlines() if driver in line
             for name in re.findall(r'%s[^`|]*' % re.escape(driver), line)
             for name in re.findall(r'--(\w+)=', name)}
    assert shown and shown - settings == set()
