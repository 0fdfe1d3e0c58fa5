"""KFP components: thin wrappers that parse inputs, call one core function and write outputs."""
