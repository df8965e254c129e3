"""Admins: the admin API, its CLI and the web page (``web``); every change audited."""
