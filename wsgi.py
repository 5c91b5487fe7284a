from chat_blueprint import create_app

app = create_app()
