"""Figures of README.md: make all's time and disk, from make time-all."""

from __future__ import annotations

FIGURES: list = []
