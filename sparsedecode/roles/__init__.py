"""Head roles of LycheeDecode: the mask, presets, files, and their learning with HardKuma gates."""
