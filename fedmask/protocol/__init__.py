"""What the server and a client say to each other beside the coded arrays: the train
instruction, which node holds which partition, and the checks on a reply's arrays."""
