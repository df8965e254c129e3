"""The rules file: rules, actions, flags, tripwires and proxy routes, parsed strictly."""
