"""The Lua scripts, shipped inside the wheel as the package data of ``ratekeeper.lua``."""
