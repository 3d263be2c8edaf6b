"""SQL as package data: warehouse migrations (migrations/) and the analytics catalog (queries/)."""
