"""Reference int8 training engine (numpy only): the spec the C firmware matches bit for bit."""
