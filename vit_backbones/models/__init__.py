"""Backbone implementations; importing this module registers them."""
