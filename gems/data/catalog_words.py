"""Readable words for the synthetic catalog: departments -> subcategories -> product nouns, plus
brands, adjectives and pack variants. Readable titles matter: item embeddings start from the mean
of the title's token embeddings, so simulated titles should carry meaning like real ones."""

from __future__ import annotations

DEPARTMENTS: dict[str, dict[str, list[str]]] = {
    "Office": {
        "Paper": ["Printer Paper", "Notebook", "Sticky Notes", "Index Cards"],
        "Writing": ["Gel Pen", "Ballpoint Pen", "Pencil", "Highlighter"],
        "Desk": ["Stapler", "Tape Dispenser", "Desk Organizer", "Paper Clips"],
        "Printing": ["Toner Cartridge", "Ink Cartridge", "Laser Printer", "Label Maker"],
    },
    "Kitchen": {
        "Cookware": ["Frying Pan", "Saucepan", "Stock Pot", "Wok"],
        "Coffee": ["Coffee Grinder", "French Press", "Espresso Cups", "Coffee Beans"],
        "Baking": ["Baking Sheet", "Mixing Bowl", "Rolling Pin", "Cake Pan"],
        "Knives": ["Chef Knife", "Paring Knife", "Knife Sharpener", "Cutting Board"],
    },
    "Outdoors": {
        "Camping": ["Tent", "Sleeping Bag", "Camp Stove", "Lantern"],
        "Hiking": ["Backpack", "Trekking Poles", "Water Bottle", "Hiking Socks"],
        "Cycling": ["Bike Helmet", "Bike Light", "Bike Lock", "Cycling Gloves"],
        "Fishing": ["Fishing Rod", "Tackle Box", "Fishing Line", "Lures"],
    },
    "Electronics": {
        "Audio": ["Headphones", "Bluetooth Speaker", "Earbuds", "Soundbar"],
        "Computing": ["Wireless Mouse", "Keyboard", "USB Hub", "Monitor Stand"],
        "Power": ["Power Bank", "Charging Cable", "Wall Charger", "Surge Protector"],
        "Photo": ["Camera Bag", "Tripod", "Memory Card", "Lens Cleaner"],
    },
    "Home": {
        "Bedding": ["Pillow", "Duvet Cover", "Bed Sheets", "Blanket"],
        "Lighting": ["Desk Lamp", "LED Bulb", "Floor Lamp", "String Lights"],
        "Storage": ["Storage Box", "Shelf", "Laundry Basket", "Hangers"],
        "Cleaning": ["Vacuum Cleaner", "Mop", "Microfiber Cloths", "Spray Bottle"],
    },
    "Sports": {
        "Fitness": ["Yoga Mat", "Dumbbells", "Resistance Bands", "Jump Rope"],
        "Running": ["Running Shoes", "Running Belt", "Sports Watch", "Compression Socks"],
        "Swimming": ["Swim Goggles", "Swim Cap", "Kickboard", "Beach Towel"],
        "Team Sports": ["Soccer Ball", "Basketball", "Shin Guards", "Water Jug"],
    },
    "Garden": {
        "Plants": ["Seed Kit", "Plant Pot", "Potting Soil", "Fertilizer"],
        "Tools": ["Pruning Shears", "Garden Trowel", "Rake", "Garden Gloves"],
        "Watering": ["Garden Hose", "Watering Can", "Sprinkler", "Hose Nozzle"],
    },
    "Toys": {
        "Puzzles": ["Jigsaw Puzzle", "Puzzle Cube", "Brain Teaser", "Puzzle Mat"],
        "Building": ["Building Blocks", "Construction Set", "Marble Run", "Magnetic Tiles"],
        "Games": ["Board Game", "Card Game", "Chess Set", "Dice Set"],
    },
}

BRANDS: list[str] = [
    "Acme", "Nordic", "Zenith", "Orion", "Maple", "Summit", "Aurora", "Pioneer", "Harbor",
    "Vertex", "Cobalt", "Willow", "Atlas", "Lumen", "Everest", "Juniper", "Falcon", "Sierra",
    "Beacon", "Meridian", "Crescent", "Evergreen", "Kestrel", "Polaris",
]
ADJECTIVES: list[str] = [
    "Blue", "Black", "Red", "Green", "White", "Grey", "Compact", "Heavy Duty", "Lightweight",
    "Premium", "Classic", "Ergonomic", "Recycled", "Bamboo", "Steel", "Waterproof", "Portable",
    "Foldable", "Wireless", "Organic", "Quiet", "Durable", "Soft", "Large", "Mini", "Eco",
]
VARIANTS: list[str] = [
    "", "2-Pack", "3-Pack", "12-Pack", "Set", "Pro", "Plus", "XL", "Mini", "V2", "Deluxe",
    "Starter Kit", "Value Pack", "Edition 2",
]
QUERY_NOISE: list[str] = [
    "best", "cheap", "good", "new", "sale", "quality", "gift", "small", "big", "for home",
    "for work", "near me", "deal", "top rated", "reviews",
]
