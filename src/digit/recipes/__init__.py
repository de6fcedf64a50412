"""Recipes: ordered, resumable sequences of `digit` commands that reproduce a reference run end to end."""
