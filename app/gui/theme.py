"""Light and dark looks: the Fusion style with a palette that follows the system's colour scheme
(or the user's choice in View > Theme), and graphs restyled to match."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from app.gui.widgets.plots import graph_colors, use_palette

THEMES = ("system", "light", "dark")


def system_is_dark(app: QApplication) -> bool:
    scheme = app.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Unknown:  # no hint from the platform: judge by its palette
        return app.palette().window().color().lightness() < 128
    return scheme == Qt.ColorScheme.Dark


def apply_theme(app: QApplication, choice: str = "system") -> bool:
    """Set the style and palette for `choice` ("system", "light" or "dark"); returns whether dark."""
    dark = choice == "dark" or (choice not in ("light", "dark") and system_is_dark(app))
    app.setStyle("Fusion")
    app.setPalette(dark_palette() if dark else light_palette())
    use_palette(dark)
    for widget in app.allWidgets():
        if isinstance(widget, pg.PlotWidget):
            restyle_plot(widget, dark)
        elif widget.styleSheet():
            # a widget with its own style sheet (and its children) keeps the palette it was polished
            # with: dark text stayed on the dark theme's dark panels until set again
            widget.setStyleSheet(widget.styleSheet())
    return dark


def light_palette() -> QPalette:
    palette = QPalette()
    colors = {QPalette.Window: "#f3f3f3", QPalette.Base: "#ffffff", QPalette.AlternateBase: "#f2f5f9",
              QPalette.Button: "#f0f0f0", QPalette.Text: "#1f1f1f", QPalette.WindowText: "#1f1f1f",
              QPalette.ButtonText: "#1f1f1f", QPalette.Highlight: "#2f7ed8", QPalette.HighlightedText: "#ffffff",
              QPalette.ToolTipBase: "#ffffe8", QPalette.ToolTipText: "#1f1f1f", QPalette.Link: "#1f6fc5",
              QPalette.PlaceholderText: "#666666", QPalette.Mid: "#b8b8b8"}
    return _palette(palette, colors, disabled="#9a9a9a")


def dark_palette() -> QPalette:
    palette = QPalette()
    colors = {QPalette.Window: "#2b2b2b", QPalette.Base: "#1e1e1e", QPalette.AlternateBase: "#262a30",
              QPalette.Button: "#353535", QPalette.Text: "#e6e6e6", QPalette.WindowText: "#e6e6e6",
              QPalette.ButtonText: "#e6e6e6", QPalette.Highlight: "#3d8ee6", QPalette.HighlightedText: "#ffffff",
              QPalette.ToolTipBase: "#3a3a3a", QPalette.ToolTipText: "#f0f0f0", QPalette.Link: "#6cb0ff",
              QPalette.PlaceholderText: "#a8a8a8", QPalette.Mid: "#5a5a5a", QPalette.Light: "#505050",
              QPalette.Dark: "#1a1a1a", QPalette.Shadow: "#101010", QPalette.BrightText: "#ff6b6b"}
    return _palette(palette, colors, disabled="#777777")


def _palette(palette: QPalette, colors: dict, disabled: str) -> QPalette:
    for role, value in colors.items():
        palette.setColor(role, QColor(value))
    for role in (QPalette.Text, QPalette.WindowText, QPalette.ButtonText):
        palette.setColor(QPalette.Disabled, role, QColor(disabled))
    return palette


def restyle_plot(plot: pg.PlotWidget, dark: bool) -> None:
    """Give an existing graph the colours of the theme (new graphs get them from `use_palette`)."""
    background, foreground = graph_colors(dark)
    plot.setBackground(background)
    item = plot.getPlotItem()
    for name in ("left", "bottom"):
        axis = item.getAxis(name)
        axis.setPen(foreground)
        axis.setTextPen(foreground)
    title = item.titleLabel
    title.setAttr("color", foreground)
    title.setText(title.text)
    legends = {id(legend): legend for legend in (item.legend, getattr(plot, "legend", None)) if legend is not None}
    for legend in legends.values():  # labels bake their colour in when set
        for _, label in legend.items:
            label.setAttr("color", foreground)
            label.setText(label.text)
