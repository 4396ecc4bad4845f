"""The desktop app: PySide6 widgets over app.core; no training maths here."""
