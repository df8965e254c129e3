"""The admin web page: server-rendered HTML, a session sign-in, forms over the admin API."""
