"""Test app for the viewer: a powercrud async-dashboard record model and manager."""
