"""Shared fixtures for the unit and loopback tiers."""

from __future__ import annotations

import base64
import os

import pytest


@pytest.fixture
def cluster_id() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def cluster_secret() -> str:
    return base64.b64encode(os.urandom(32)).decode()
