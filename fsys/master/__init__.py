"""The master side: launcher, control device, path policy, placeholders and fmhub."""
